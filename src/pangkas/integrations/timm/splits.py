"""timm modules that split their input by sizes held in plain attributes.

Res2Net's bottlenecks (``timm.models.res2net.Bottle2neck``, DLA's ``DlaBottle2neck``) split by
``self.width``, the selective-kernel conv (``timm.layers.SelectiveKernel``) by
``self.in_channels // self.num_paths`` and CSPNet's cross stages by ``self.expand_chs // 2``: one
size for every piece, so pruning keeps the pieces equal (each loses the same offsets). MambaOut's
gated conv block (``split_indices``: gate, identity, conv), CoaT's convolutional position
encoding (``channel_splits``, one piece per window size) and the mixed conv
(``timm.layers.MixedConv2d``, ``splits``) split by a list of sizes: their pieces, equal or not,
lose channels of their own (``following_modules`` tells the tracer). Either way the attributes
must follow the pieces' new sizes, read from the convolutions and linears that produce or take
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
GATED_CONV = "timm.models.mambaout.GatedConvBlock"
CONV_POSITION = "timm.models.coat.ConvRelPosEnc"
# Classes whose forward splits by a list of sizes, all of which _sizes recomputes.
FOLLOWING = (MIXED_CONV, GATED_CONV, CONV_POSITION)


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
    if name == GATED_CONV:  # gate * cat(identity, conv): the gate is as wide as the other two
        hidden, conv = m.fc2.in_features, m.conv.in_channels
        return {"split_indices": (hidden, hidden - conv, conv)}
    if name == CONV_POSITION:
        return {"channel_splits": [conv.in_channels for conv in m.conv_list]}
    return None


def following_modules(model: nn.Module) -> list[str]:
    """The modules whose splits follow the cut (their sizes are recomputed by the fixer)."""
    return [name for name, m in model.named_modules() if qualname(m) in FOLLOWING]


def fix_split_sizes(model: nn.Module, undo: Undo) -> None:
    """Surgery fixer: set each module's split attributes to what its convolutions now take."""
    for m in model.modules():
        sizes = _sizes(m)
        if sizes and any(getattr(m, k) != v for k, v in sizes.items()):
            undo.remember(m, tuple(sizes))
            for k, v in sizes.items():
                setattr(m, k, v)
