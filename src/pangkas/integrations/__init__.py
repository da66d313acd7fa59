"""Library-specific knowledge the generic engine cannot trace (kept out of the engine itself)."""

from __future__ import annotations

from torch import nn

from . import huggingface, multihead_attention, swin
from .heads import Adapter


def adapter(model: nn.Module) -> Adapter | None:
    """The tracer's adapter for ``model``'s attention modules, if it has any it knows."""
    modules = {**huggingface.attention_modules(model), **multihead_attention.attention_modules(model),
               **swin.attention_modules(model)}
    return Adapter(model, modules) if modules else None
