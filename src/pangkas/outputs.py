"""What a model (or a module, or an op) returns: its tensors however nested, and its primary one.

A tensor, tuples and lists, dicts (by value) and Hugging Face ``ModelOutput`` (by ``to_tuple()``,
its fields that are set), nested in any way; other containers torch's pytree knows are opened too.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import SUPPORTED_NODES, tree_flatten

from .errors import PangkasError


def tensors(output) -> list[torch.Tensor]:
    """Every tensor in ``output``, depth first, in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in tensors(item)]
    if type(output) not in SUPPORTED_NODES:  # a leaf (a number, None, ...): no tensor
        return []
    return [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]


def first_tensor(output) -> torch.Tensor | None:
    """The first tensor in ``output`` (a block's hidden state), or None."""
    found = tensors(output)
    return found[0] if found else None


def primary_tensor(output) -> torch.Tensor:
    """The tensor a model's output is judged by: its ``logits`` if it has them, else its first."""
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    found = first_tensor(output)
    if found is None:
        raise PangkasError(f"the model's output ({type(output).__name__}) holds no tensor")
    return found
