"""The yardsticks pruned models are judged by: perplexity of a causal language model.

Perplexity is measured on fixed, non-overlapping windows of one token stream (the texts joined
by a blank line, or ids given directly), each window scored on its own: ``exp`` of the mean
negative log-likelihood of every token after a window's first. The same windows give the same
number for every model, so models compare directly; windows are the unit of calibration/evaluation
splits (see ``windows``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PangkasError
from .inputs import without_cache
from .modules import evaluating
from .progress import track


def token_ids(texts_or_ids, tokenizer=None) -> torch.Tensor:
    """One 1-D stream of token ids: ``texts_or_ids`` is a string, a list of strings (joined by
    a blank line; needs ``tokenizer``, a Hugging Face tokenizer or ``fn(str) -> ids``), or ids
    (a 1-D tensor or a list of ints)."""
    if isinstance(texts_or_ids, str):
        texts_or_ids = [texts_or_ids]
    if isinstance(texts_or_ids, torch.Tensor):
        ids = texts_or_ids
    elif isinstance(texts_or_ids, Sequence) and texts_or_ids and all(isinstance(t, str) for t in texts_or_ids):
        if tokenizer is None:
            raise PangkasError("texts need tokenizer= (a Hugging Face tokenizer or fn(text) -> ids)")
        ids = _encode(tokenizer, "\n\n".join(texts_or_ids))
    elif isinstance(texts_or_ids, Sequence) and texts_or_ids and all(isinstance(t, int) for t in texts_or_ids):
        ids = torch.tensor(texts_or_ids)
    else:
        raise PangkasError("perplexity needs text (a string or a list of strings) or token ids "
                           f"(a 1-D tensor or a list of ints), got {type(texts_or_ids).__name__}")
    if ids.ndim != 1 or ids.dtype not in (torch.int32, torch.int64) or ids.numel() == 0:
        raise PangkasError(f"token ids must be a non-empty 1-D integer tensor, got shape "
                           f"{tuple(ids.shape)} of {ids.dtype}")
    return ids.long()


def _encode(tokenizer, text: str) -> torch.Tensor:
    if hasattr(tokenizer, "encode"):
        return torch.tensor(tokenizer.encode(text, add_special_tokens=False))
    return torch.as_tensor(tokenizer(text))


def windows(ids: torch.Tensor, length: int, count: int | None = None, start: int = 0) -> torch.Tensor:
    """``(count, length)`` consecutive non-overlapping windows of ``ids`` from window ``start``
    on (all that fit when ``count`` is None); a partial last window is dropped."""
    if not isinstance(length, int) or length < 2:
        raise PangkasError(f"window must be an int >= 2 (one token predicts the next), got {length!r}")
    available = ids.numel() // length - start
    if count is None:
        count = available
    if count < 1 or count > available:
        raise PangkasError(f"the text has {ids.numel()} tokens: {max(available, 0)} windows of {length} "
                           f"from window {start}, not {count}")
    return ids[start * length:(start + count) * length].view(count, length)


@torch.no_grad()
def perplexity(model: nn.Module, texts_or_ids, *, tokenizer=None, window: int = 512,
               max_windows: int | None = None, batch_size: int = 4) -> float:
    """Perplexity of a causal LM on ``texts_or_ids`` (see :func:`token_ids`), in fixed windows
    of ``window`` tokens (at most ``max_windows``). ``model(input_ids)`` must give logits (a
    tensor or an output with ``.logits``). The model's mode and cache setting are restored."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PangkasError(f"batch_size must be a positive int, got {batch_size!r}")
    ids = token_ids(texts_or_ids, tokenizer)
    chunks = windows(ids, window)
    if max_windows is not None:
        chunks = chunks[:max_windows]
    total, count = 0.0, 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with evaluating(model), without_cache(model):
        for batch in track(chunks.split(batch_size), "perplexity"):
            logits = _logits(model(batch.to(device)))
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten().to(device),
                                  reduction="sum")
            total += float(nll)
            count += batch[:, 1:].numel()
    return math.exp(total / count) if math.isfinite(total / count) else math.inf


def _logits(output) -> torch.Tensor:
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
        raise PangkasError("perplexity needs a model whose output is logits (batch, tokens, vocabulary) "
                           "or has .logits")
    return logits
