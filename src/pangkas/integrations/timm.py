"""timm modules that split their input by a size held in a plain attribute.

Res2Net's bottlenecks (``timm.models.res2net.Bottle2neck``, DLA's ``DlaBottle2neck``) split by
``self.width``, the selective-kernel conv (``timm.layers.SelectiveKernel``) by
``self.in_channels // self.num_paths``, CSPNet's cross stages by ``self.expand_chs // 2`` and the
mixed conv (``timm.layers.MixedConv2d``) by ``self.splits``. The trace sees only the pieces; equal
ones pruning keeps equal (each loses the same offsets; unequal ones keep their channels). These
attributes must follow the pieces' new size, read from the convolutions that produce or take
them.

timm's attention modules listed in ``HEADED`` (a fused ``qkv`` Linear viewed as
``(3, num_heads, head_dim)``) lose whole heads: head_dim, hence the attention scale, stays, so it is exact; ``num_heads`` (and
``attn_dim``) follow the cut. Nothing of timm is imported here.
"""

from __future__ import annotations

from torch import nn

from ..graph.adapter import Heads
from ..surgery import Undo
from .integration import Integration

RES2NET = ("timm.models.res2net.Bottle2neck", "timm.models.dla.DlaBottle2neck")
SELECTIVE_KERNEL = "timm.layers.selective_kernel.SelectiveKernel"
CROSS_STAGE = ("timm.models.cspnet.CrossStage", "timm.models.cspnet.CrossStage3")
MIXED_CONV = "timm.layers.mixed_conv2d.MixedConv2d"
# Attention classes whose forward sizes follow num_heads (checked: ViT/DeiT/PiT, Swin); others,
# whose code sizes heads otherwise (EfficientFormer, CrossViT), keep theirs rather than retry.
HEADED = ("timm.layers.attention.Attention", "timm.models.swin_transformer.WindowAttention")


def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _sizes(m: nn.Module) -> dict[str, int] | None:
    """The split attributes ``m`` should hold after surgery (None: not a module of this family)."""
    name = _qualname(m)
    if name in RES2NET:
        return {"width": m.convs[0].in_channels}
    if name == SELECTIVE_KERNEL:
        convs = [path.conv for path in m.paths]
        fed = sum(c.in_channels for c in convs) if m.split_input else convs[0].in_channels
        return {"in_channels": fed, "out_channels": convs[0].out_channels}
    if name in CROSS_STAGE:
        return {"expand_chs": m.conv_exp.conv.out_channels}
    if name == MIXED_CONV:
        splits = [conv.in_channels for conv in m.values()]
        return {"splits": splits, "in_channels": sum(splits),
                "out_channels": sum(conv.out_channels for conv in m.values())}
    return None


def _fix_split_sizes(model: nn.Module, undo: Undo) -> None:
    """Surgery fixer: set each module's split attributes to what its convolutions now take."""
    for m in model.modules():
        sizes = _sizes(m)
        if sizes and any(getattr(m, k) != v for k, v in sizes.items()):
            undo.remember(m, tuple(sizes))
            for k, v in sizes.items():
                setattr(m, k, v)


def _head_dim(m: nn.Module) -> int | None:
    """A timm attention module's head size: its ``head_dim``, else from its ``scale``."""
    if isinstance(getattr(m, "head_dim", None), int):
        return m.head_dim
    scale = getattr(m, "scale", None)
    return round(scale ** -2) if isinstance(scale, float) and scale > 0 else None


def _heads(m: nn.Module) -> Heads | None:
    """Head counts of a timm attention module with a fused qkv projection, from its current sizes."""
    qkv, head_dim = getattr(m, "qkv", None), _head_dim(m)
    if not (_qualname(m) in HEADED and isinstance(qkv, nn.Linear)
            and isinstance(getattr(m, "num_heads", None), int) and head_dim):
        return None
    heads, rest = divmod(qkv.out_features, 3 * head_dim)
    return Heads(heads, heads, head_dim) if heads and not rest else None


def _attention(model: nn.Module) -> dict[str, Heads]:
    return {name: h for name, m in model.named_modules() if (h := _heads(m)) is not None}


def _fix_heads(model: nn.Module, undo: Undo) -> None:
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


INTEGRATION = Integration(name="timm", attention=_attention, fixers=(_fix_split_sizes, _fix_heads))
