"""timm: modules whose sizes live in plain attributes the trace cannot see.

``splits``: split sizes held in attributes (Res2Net, selective kernel, CSP stages, mixed conv);
``heads``: attention modules that lose whole heads; ``mixing``: gated, head-mixing and
cross-covariance attentions (ConViT, CaiT, XCiT) traced as head-prunable subclasses. Nothing of
timm is imported here.
"""

from __future__ import annotations

from torch import nn

from ...graph.adapter import Heads
from ..integration import Integration
from . import heads, mixing
from .splits import fix_split_sizes


def attention_modules(model: nn.Module) -> dict[str, Heads]:
    return {**heads.attention_modules(model), **mixing.attention_modules(model)}


INTEGRATION = Integration(name="timm", attention=attention_modules, traced_as=mixing.TRACED_AS,
                          fixers=(fix_split_sizes, heads.fix_heads, mixing.fix_mixing_heads))
