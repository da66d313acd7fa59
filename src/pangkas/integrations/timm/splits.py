"""timm modules that split their input by a size held in a plain attribute.

Res2Net's bottlenecks (``timm.models.res2net.Bottle2neck``, DLA's ``DlaBottle2neck``) split by
``self.width``, the selective-kernel conv (``timm.layers.SelectiveKernel``) by
``self.in_channels // self.num_paths``, CSPNet's cross stages by ``self.expand_chs // 2`` and the
mixed conv (``timm.layers.MixedConv2d``) by ``self.splits``. The trace sees only the pieces; equal
ones pruning keeps equal (each loses the same offsets; unequal ones keep their channels). These
attributes must follow the pieces' new size, read from the convolutions that produce or take
them. Nothing of timm is imported here.
"""

from __future__ import annotations

from torch import nn

from ...surgery import Undo
from ..integration import qualname

RES2NET = ("timm.models.res2net.Bottle2neck", "timm.models.dla.DlaBottle2neck")
SELECTIVE_KERNEL = "timm.layers.selective_kernel.SelectiveKernel"
CROSS_STAGE = ("timm.models.cspnet.CrossStage", "timm.models.cspnet.CrossStage3")
MIXED_CONV = "timm.layers.mixed_conv2d.MixedConv2d"


def _sizes(m: nn.Module) -> dict[str, int] | None:
    """The split attributes ``m`` should hold after surgery (None: not a module of this family)."""
    name = qualname(m)
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


def fix_split_sizes(model: nn.Module, undo: Undo) -> None:
    """Surgery fixer: set each module's split attributes to what its convolutions now take."""
    for m in model.modules():
        sizes = _sizes(m)
        if sizes and any(getattr(m, k) != v for k, v in sizes.items()):
            undo.remember(m, tuple(sizes))
            for k, v in sizes.items():
                setattr(m, k, v)
