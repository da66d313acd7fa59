"""Attention heads as pruning units: what the tracer asks about attention modules."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Heads:
    heads: int
    kv_heads: int
    head_dim: int


class Adapter:
    """What the tracer asks about attention modules (see ``graph.rules``)."""

    def __init__(self, model: nn.Module, modules: dict[str, Heads]):
        self.modules = modules
        self.fused = {name for name in modules if hasattr(model.get_submodule(name), "qkv_proj")}

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
        which the surgery fixer updates (the shape check confirms it)."""
        return self._owner(module_name) in self.fused
