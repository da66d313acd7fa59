"""Channel importance criteria by name, and what ``importance=`` may be."""

from __future__ import annotations

from ..errors import PangkasError
from ..registry import Registry
from .base import FromFunction, Importance

CRITERIA: Registry[Importance] = Registry("channel importance", Importance)


def register(criterion: Importance, *, replace: bool = False) -> Importance:
    """Make ``criterion`` usable as ``importance=criterion.name``; a name already taken is
    refused unless ``replace=True``."""
    return CRITERIA.register(criterion, replace=replace)


def unregister(name: str) -> Importance:
    return CRITERIA.unregister(name)


def names() -> tuple[str, ...]:
    """The registered criteria's names."""
    return CRITERIA.names()


def resolve(importance, data=None, loss_fn=None) -> Importance:
    """The criterion ``importance`` names or is (a name, an :class:`Importance`, or a plain
    ``fn(tensor, dim) -> scores``), once its needs are met by ``data`` and ``loss_fn``."""
    criterion = _criterion(importance)
    if criterion.needs_loss and (data is None or loss_fn is None):
        raise PangkasError(f"importance={criterion.name!r} needs data= (batches) and "
                           "loss_fn=(output, batch) -> loss")
    if criterion.needs_data and data is None:
        raise PangkasError(f"importance={criterion.name!r} needs data= (calibration batches the model accepts)")
    return criterion


def _criterion(importance) -> Importance:
    if isinstance(importance, Importance):
        return importance
    if isinstance(importance, str) and importance in CRITERIA:
        return CRITERIA.get(importance)
    if isinstance(importance, type) and issubclass(importance, Importance):
        raise PangkasError(f"importance= takes an instance: importance={importance.__name__}()")
    if callable(importance) and not isinstance(importance, str):
        return FromFunction(importance)
    raise PangkasError(f"importance must be one of {list(names())} (the registered names), an Importance "
                       f"object or a callable fn(tensor, dim) -> scores, got {importance!r}")
