"""What the coupling rules may ask about a model's modules beyond its ops: attention heads, and
splits whose sizes the model recomputes.

A rule that sees a projection viewed as ``(heads, head_dim)`` cannot tell from the shapes alone
which dim is the unit; the model family knows. Nor can it tell a split at constant sizes from one
at sizes held in attributes that surgery updates. ``graph.rules`` asks an :class:`Adapter`; the
integrations describe their attention modules as :class:`Heads` and the modules whose splits
follow the cut by name, and :class:`HeadAdapter` answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Heads:
    """An attention module's current head counts. ``fused``: its q, k and v come from one
    projection sliced at offsets computed from the head counts (which surgery updates)."""

    heads: int
    kv_heads: int
    head_dim: int
    fused: bool = False


class Adapter(Protocol):
    """The questions ``graph.rules`` asks while tracing (``e.adapter``)."""

    def split_keep(self, module_name: str, sizes: list[int]) -> int | None:
        """Which of ``sizes`` (a dim split by a view inside ``module_name``) keeps the channel
        ids, or None for the rules' default (the innermost)."""

    def slices_follow(self, module_name: str) -> bool:
        """Whether slices inside ``module_name`` have bounds that follow the pruned sizes."""

    def splits_follow(self, module_name: str) -> bool:
        """Whether a split run by ``module_name`` itself cuts at sizes that follow the pruned
        pieces (attributes an integration recomputes), so that each piece may lose its own."""


class HeadAdapter:
    """Whole attention heads as the unit, for the attention modules found (by module name);
    ``following``: the modules whose splits follow the cut."""

    def __init__(self, modules: dict[str, Heads], following: frozenset[str] = frozenset()):
        self.modules = modules
        self.following = following

    def _owner(self, module_name: str) -> str | None:
        return next((name for name in self.modules
                     if module_name == name or module_name.startswith(name + ".")), None)

    def split_keep(self, module_name: str, sizes: list[int]) -> int | None:
        """Inside an attention module, a projection viewed as (heads, head_dim) keeps heads."""
        owner = self._owner(module_name)
        if owner is None:
            return None
        h = self.modules[owner]
        for i in range(len(sizes) - 1):
            if sizes[i] in (h.heads, h.kv_heads) and sizes[i + 1] == h.head_dim:
                return i
        return None

    def slices_follow(self, module_name: str) -> bool:
        """Slices of a fused qkv projection are cut at offsets computed from the head counts,
        which the integration's surgery fixer updates (the shape check confirms it)."""
        owner = self._owner(module_name)
        return owner is not None and self.modules[owner].fused

    def splits_follow(self, module_name: str) -> bool:
        """Only the module's own code: a submodule's splits are its own family's business."""
        return module_name in self.following
