"""Layer importance criteria by name, and what ``plan_layers(importance=)`` may be."""

from __future__ import annotations

from ..errors import PangkasError
from ..registry import Registry
from .base import FromFunction, LayerImportance

CRITERIA: Registry[LayerImportance] = Registry("layer importance", LayerImportance, FromFunction,
                                               "fn(model, candidates, data) -> scores")
register, unregister, names = CRITERIA.register, CRITERIA.unregister, CRITERIA.names


def resolve(importance, loss_fn=None, metric_fn=None) -> LayerImportance:
    """The criterion ``importance`` names or is (a name, a :class:`LayerImportance`, or a plain
    ``fn(model, candidates, data) -> scores``), once ``loss_fn`` / ``metric_fn`` meet its needs."""
    criterion = CRITERIA.resolve(importance)
    if criterion.needs_loss and loss_fn is None:
        raise PangkasError(f"importance={criterion.name!r} needs loss_fn=(output, batch) -> scalar")
    if criterion.needs_metric and metric_fn is None:
        raise PangkasError(f"importance={criterion.name!r} needs metric_fn=(output, batch) -> scalar "
                           "(higher is better)")
    return criterion
