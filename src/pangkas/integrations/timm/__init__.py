"""timm: modules whose sizes live in plain attributes the trace cannot see.

``splits``: split sizes held in attributes (Res2Net, selective kernel, CSP stages, mixed conv);
``heads``: attention modules that lose whole heads; ``attention``: those whose forward sizes
from the input width, traced and run as head-prunable subclasses (BEiT, EVA, PVT-v2). Nothing of
timm is imported here.
"""

from __future__ import annotations

from torch import nn

from ...graph.adapter import Heads
from ..integration import Integration
from . import attention
from .heads import attention_modules, fix_heads
from .splits import fix_split_sizes


def _attention_modules(model: nn.Module) -> dict[str, Heads]:
    return {**attention_modules(model), **attention.attention_modules(model)}


INTEGRATION = Integration(name="timm", attention=_attention_modules, traced_as=attention.TRACED_AS,
                          fixers=(fix_split_sizes, fix_heads, attention.fix_heads))
