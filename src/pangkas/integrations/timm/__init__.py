"""timm: modules whose sizes live in plain attributes the trace cannot see.

``splits``: split sizes held in attributes (Res2Net, selective kernel, CSP stages, mixed conv,
MambaOut, CoaT); ``heads``: attention modules that lose whole heads; ``attention``: those whose
forward sizes from the input width or whose bias is per head, traced (and where needed, run) as
head-prunable subclasses (BEiT, EVA, PVT-v2, Twins, MaxViT/CoAtNet); ``mixing``: gated,
head-mixing, factorised and cross-covariance attentions (ConViT, CaiT, CoaT, XCiT, EdgeNeXt),
likewise; ``norms``: weight-standardised convs and global response norms, traced (and once cut,
run) as exact prunable subclasses. Nothing of timm is imported here.
"""

from __future__ import annotations

from torch import nn

from ...graph.adapter import Heads
from ..integration import Integration
from . import attention, heads, mixing
from .norms import fix_response_norms, fix_standardised_convs, traced_forms
from .splits import fix_split_sizes, following_modules


def attention_modules(model: nn.Module) -> dict[str, Heads]:
    return {**heads.attention_modules(model), **attention.attention_modules(model), **mixing.attention_modules(model)}


INTEGRATION = Integration(
    name="timm",
    attention=attention_modules,
    splits=following_modules,
    traced_as={**traced_forms(), **attention.TRACED_AS, **mixing.TRACED_AS},
    fixers=(fix_split_sizes, heads.fix_heads, attention.fix_heads, mixing.fix_mixing_heads, fix_standardised_convs,
            fix_response_norms),
)
