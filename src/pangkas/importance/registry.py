"""Channel importance criteria by name, and what ``importance=`` may be."""

from __future__ import annotations

from ..errors import PangkasError
from ..registry import Registry
from .base import FromFunction, Importance

CRITERIA: Registry[Importance] = Registry("channel importance", Importance, FromFunction,
                                         "fn(tensor, dim) -> scores")
register, unregister, names = CRITERIA.register, CRITERIA.unregister, CRITERIA.names


def resolve(importance, data=None, loss_fn=None) -> Importance:
    """The criterion ``importance`` names or is (a name, an :class:`Importance`, or a plain
    ``fn(tensor, dim) -> scores``), once its needs are met by ``data`` and ``loss_fn``."""
    criterion = CRITERIA.resolve(importance)
    if criterion.needs_loss and (data is None or loss_fn is None):
        raise PangkasError(f"importance={criterion.name!r} needs data= (batches) and "
                           "loss_fn=(output, batch) -> loss")
    if criterion.needs_data and data is None:
        raise PangkasError(f"importance={criterion.name!r} needs data= (calibration batches the model accepts)")
    return criterion
