"""Repeated blocks: a stack of same-class layers, and the same place in each of its layers.

Transformers, ResNet stages and most CNNs repeat one block; pruning finds them to score blocks
(layer pruning), to prune one block at a time (one-shot weight pruning) and to treat the same
line of code in every repetition alike (channel surgery).
"""

from __future__ import annotations

import re

from torch import nn

_INDEX = re.compile(r"(^|\.)\d+(?=\.|$)")


def is_stack(container: nn.Module) -> bool:
    """A ``ModuleList`` or ``Sequential`` of more than one module, all of one class."""
    return (isinstance(container, (nn.ModuleList, nn.Sequential)) and len(container) > 1
            and len({type(m) for m in container.children()}) == 1)


def same_place(path: str) -> str:
    """``path`` with its indices as ``*`` (``layers.3.attn`` -> ``layers.*.attn``): equal for
    the same module in every repetition of a stack."""
    return _INDEX.sub(r"\1*", path)
