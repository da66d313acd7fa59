"""timm attention modules that lose whole heads.

The classes in ``HEADED`` take a fused ``qkv`` Linear viewed as ``(3, num_heads, head_dim)`` and
size everything else from ``num_heads``: head_dim, hence the attention scale, stays, so removing
whole heads is exact; ``num_heads`` (and ``attn_dim``) follow the cut. Nothing of timm is
imported here.
"""

from __future__ import annotations

from torch import nn

from ...graph.adapter import Heads
from ...surgery import Undo
from ..integration import qualname

# Attention classes whose forward sizes follow num_heads (checked: ViT/DeiT/PiT, Swin); others,
# whose code sizes heads otherwise (EfficientFormer, CrossViT), keep theirs rather than retry.
HEADED = ("timm.layers.attention.Attention", "timm.models.swin_transformer.WindowAttention")


def _head_dim(m: nn.Module) -> int | None:
    """A timm attention module's head size: its ``head_dim``, else from its ``scale``."""
    if isinstance(getattr(m, "head_dim", None), int):
        return m.head_dim
    scale = getattr(m, "scale", None)
    return round(scale ** -2) if isinstance(scale, float) and scale > 0 else None


def _heads(m: nn.Module) -> Heads | None:
    """Head counts of a timm attention module with a fused qkv projection, from its current sizes."""
    qkv, head_dim = getattr(m, "qkv", None), _head_dim(m)
    if not (qualname(m) in HEADED and isinstance(qkv, nn.Linear)
            and isinstance(getattr(m, "num_heads", None), int) and head_dim):
        return None
    heads, rest = divmod(qkv.out_features, 3 * head_dim)
    return Heads(heads, heads, head_dim) if heads and not rest else None


def attention_modules(model: nn.Module) -> dict[str, Heads]:
    return {name: h for name, m in model.named_modules() if (h := _heads(m)) is not None}


def fix_heads(model: nn.Module, undo: Undo) -> None:
    """Surgery fixer: timm attention modules learn their new head count (and attention width)."""
    for m in model.modules():
        h = _heads(m)
        if h is None or h.heads == m.num_heads:
            continue
        widths = [n for n in ("attn_dim", "all_head_dim") if getattr(m, n, None) == m.num_heads * h.head_dim]
        undo.remember(m, ("num_heads", *widths))
        for n in widths:
            setattr(m, n, h.heads * h.head_dim)
        m.num_heads = h.heads
