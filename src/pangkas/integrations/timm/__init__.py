"""timm: modules whose sizes live in plain attributes the trace cannot see.

``splits``: split sizes held in attributes (Res2Net, selective kernel, CSP stages, mixed conv);
``heads``: attention modules that lose whole heads; ``norms``: weight-standardised convs and
global response norms, traced (and once cut, run) as exact prunable subclasses. Nothing of timm
is imported here.
"""

from __future__ import annotations

from ..integration import Integration
from .heads import attention_modules, fix_heads
from .norms import fix_response_norms, fix_standardised_convs, traced_forms
from .splits import fix_split_sizes

INTEGRATION = Integration(name="timm", attention=attention_modules, traced_as=traced_forms(),
                          fixers=(fix_split_sizes, fix_heads, fix_standardised_convs, fix_response_norms))
