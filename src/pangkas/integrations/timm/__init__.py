"""timm: modules whose sizes live in plain attributes the trace cannot see.

``splits``: split sizes held in attributes (Res2Net, selective kernel, CSP stages, mixed conv,
MambaOut, CoaT);
``heads``: attention modules that lose whole heads. Nothing of timm is imported here.
"""

from __future__ import annotations

from ..integration import Integration
from .heads import attention_modules, fix_heads
from .splits import fix_split_sizes, following_modules

INTEGRATION = Integration(name="timm", attention=attention_modules, splits=following_modules,
                          fixers=(fix_split_sizes, fix_heads))
