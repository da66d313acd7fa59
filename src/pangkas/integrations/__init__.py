"""Model-family knowledge the generic engine cannot trace, one ``Integration`` per family.

The families below are registered here, explicitly (importing a family module registers
nothing). A user adds a family with :func:`register`, or for one call with ``integrations=[...]``.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import PangkasError
from ..registry import Registry
from . import huggingface, multihead_attention, recurrent, swin, timm
from .integration import Integration, Integrations

__all__ = ["Integration", "Integrations", "active", "names", "register", "registered", "unregister"]

FAMILIES: Registry[Integration] = Registry("model-family integration", Integration)


def register(integration: Integration, *, replace: bool = False) -> Integration:
    """Use ``integration`` in every call from now on; a name already taken is refused unless
    ``replace=True``."""
    return FAMILIES.register(integration, replace=replace)


def unregister(name: str) -> Integration:
    return FAMILIES.unregister(name)


def names() -> tuple[str, ...]:
    """The registered integrations' names, in the order they are asked."""
    return FAMILIES.names()


def registered() -> tuple[Integration, ...]:
    return tuple(FAMILIES.get(name) for name in FAMILIES.names())


def active(extra: Iterable[Integration] | None = None) -> Integrations:
    """The registered integrations, then ``extra`` (a call's ``integrations=``)."""
    if extra is None:
        extra = ()
    if not isinstance(extra, (list, tuple)):
        raise PangkasError(f"integrations= takes a list of pangkas.integrations.Integration, got {extra!r}")
    members = list(registered())
    for integration in extra:
        if not isinstance(integration, Integration):
            raise PangkasError(f"integrations= takes Integration objects, got {type(integration).__name__}")
        if integration in members:
            continue
        if any(integration.name == m.name for m in members):
            raise PangkasError(f"two integrations are named {integration.name!r}; give yours another name")
        members.append(integration)
    return Integrations(members)


for _family in (huggingface, multihead_attention, recurrent, swin, timm):
    register(_family.INTEGRATION)
