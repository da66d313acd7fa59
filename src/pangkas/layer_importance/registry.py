"""Layer importance criteria by name, and what ``plan_layers(importance=)`` may be."""

from __future__ import annotations

from ..errors import PangkasError
from ..registry import Registry
from .base import FromFunction, LayerImportance

CRITERIA: Registry[LayerImportance] = Registry("layer importance", LayerImportance)


def register(criterion: LayerImportance, *, replace: bool = False) -> LayerImportance:
    """Make ``criterion`` usable as ``plan_layers(importance=criterion.name)``; a name already
    taken is refused unless ``replace=True``."""
    return CRITERIA.register(criterion, replace=replace)


def unregister(name: str) -> LayerImportance:
    return CRITERIA.unregister(name)


def names() -> tuple[str, ...]:
    """The registered criteria's names."""
    return CRITERIA.names()


def resolve(importance, loss_fn=None, metric_fn=None) -> LayerImportance:
    """The criterion ``importance`` names or is (a name, a :class:`LayerImportance`, or a plain
    ``fn(model, candidates, data) -> scores``), once ``loss_fn`` / ``metric_fn`` meet its needs."""
    criterion = _criterion(importance)
    if criterion.needs_loss and loss_fn is None:
        raise PangkasError(f"importance={criterion.name!r} needs loss_fn=(output, batch) -> scalar")
    if criterion.needs_metric and metric_fn is None:
        raise PangkasError(f"importance={criterion.name!r} needs metric_fn=(output, batch) -> scalar "
                           "(higher is better)")
    return criterion


def _criterion(importance) -> LayerImportance:
    if isinstance(importance, LayerImportance):
        return importance
    if isinstance(importance, str) and importance in CRITERIA:
        return CRITERIA.get(importance)
    if isinstance(importance, type) and issubclass(importance, LayerImportance):
        raise PangkasError(f"importance= takes an instance: importance={importance.__name__}()")
    if callable(importance) and not isinstance(importance, (str, type)):
        return FromFunction(importance)
    raise PangkasError(f"importance must be one of {list(names())} (the registered names), a LayerImportance "
                       f"object or a function fn(model, candidates, data) -> scores, got {importance!r}")
