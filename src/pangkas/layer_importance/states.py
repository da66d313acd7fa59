"""What a block reads and writes: its hidden states on the calibration batches."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..inputs import call_model
from ..outputs import first_tensor


def input_tensor(args, kwargs) -> torch.Tensor | None:
    """The hidden state a block is called with (positional, or ``hidden_states=`` in Hugging Face)."""
    return first_tensor((args, kwargs.get("hidden_states"), kwargs))


def real_tokens(batch, x: torch.Tensor) -> torch.Tensor | None:
    """Which positions of hidden state ``x`` are real tokens (``attention_mask != 0`` in a dict
    batch, as a bool per row of ``x``'s features-last rows), or None: all of them."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(x.shape[:-1]):
        return mask.reshape(-1).to(device=x.device) != 0
    return None


def _features(t: torch.Tensor) -> int:
    """The dim holding features: channels for NCHW maps, the last dim otherwise."""
    return 1 if t.ndim == 4 else t.ndim - 1


def cosine(x: torch.Tensor, y: torch.Tensor, batch) -> torch.Tensor:
    """Mean cosine similarity of ``x`` and ``y`` per position (tokens, pixels); padding tokens
    (``attention_mask == 0`` in a dict batch) do not count."""
    dim = _features(x)
    cos = nn.functional.cosine_similarity(x.float(), y.float(), dim=dim, eps=1e-8)
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if isinstance(mask, torch.Tensor) and mask.shape == cos.shape:
        return (cos * mask).sum() / mask.sum().clamp_min(1)
    return cos.mean()


def hidden_states(model, candidates, data) -> Iterable[tuple[object, dict]]:
    """Per batch: the batch, and each candidate's (input, output) hidden states."""
    captured: dict[str, tuple] = {}
    by_module = {id(model.get_submodule(c.name)): c.name for c in candidates}

    def hook(module, args, kwargs, output):
        captured[by_module[id(module)]] = (input_tensor(args, kwargs), first_tensor(output))

    handles = [model.get_submodule(c.name).register_forward_hook(hook, with_kwargs=True) for c in candidates]
    try:
        for batch in data:
            captured.clear()
            with torch.no_grad():
                call_model(model, batch)
            yield batch, captured
    finally:
        for h in handles:
            h.remove()
