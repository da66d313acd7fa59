"""How much each channel matters, for channel and layer pruning alike.

A channel is a class of coupled positions (a conv's output filter, the BatchNorm entry after it,
the next conv's input slice, ...). A criterion scores every position of every parameter dim;
scores are made scale-free per tensor dim (divided by their mean) and summed over the positions of
each channel, so a channel's importance aggregates every tensor it touches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .errors import PangkasError
from .inputs import call_model
from .modules import evaluating

# fn(tensor, dim) -> one score per index of ``dim``
SliceScore = Callable[[torch.Tensor, int], torch.Tensor]


def _others(t: torch.Tensor, dim: int) -> list[int]:
    return [d for d in range(t.ndim) if d != dim]


def l1(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of |w| over the slice (the source document's criterion)."""
    return t.abs().sum(_others(t, dim)) if t.ndim > 1 else t.abs()


def l2(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.pow(2).sum(_others(t, dim)).sqrt() if t.ndim > 1 else t.abs()


def fpgm(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Filter pruning via geometric median (He et al. 2019): a filter close to all the others is
    replaceable; score = its summed distance to the other filters of the same layer."""
    flat = t.movedim(dim, 0).reshape(t.shape[dim], -1)
    return torch.cdist(flat[None], flat[None])[0].sum(1)


CRITERIA: dict[str, SliceScore] = {"l1": l1, "l2": l2, "fpgm": fpgm}
NAMES = ("l1", "l2", "fpgm", "bn_scale", "taylor", "random")


def check(importance, data, loss_fn) -> None:
    if callable(importance):
        return
    if importance not in NAMES:
        raise PangkasError(f"importance must be one of {list(NAMES)} or a callable fn(tensor, dim), "
                           f"got {importance!r}")
    if importance == "taylor" and (data is None or loss_fn is None):
        raise PangkasError("importance='taylor' needs data= (batches) and loss_fn=(output, batch) -> loss")


@torch.enable_grad()
def gradients(model: nn.Module, data: Iterable, loss_fn) -> dict[str, torch.Tensor]:
    """Summed gradients of ``loss_fn(model(batch), batch)`` over ``data`` by parameter name; the
    model's own ``.grad`` fields and train/eval flags are left as they were."""
    params = dict(model.named_parameters())
    saved = {n: p.grad for n, p in params.items()}
    totals = {n: torch.zeros_like(p) for n, p in params.items()}
    batches = 0
    try:
        with evaluating(model):
            for batch in data:
                for p in params.values():
                    p.grad = None
                loss_fn(call_model(model, batch), batch).backward()
                for n, p in params.items():
                    if p.grad is not None:
                        totals[n] += p.grad
                batches += 1
    finally:
        for n, p in params.items():
            p.grad = saved[n]
    if not batches:
        raise PangkasError("data= yielded no batches")
    return totals


def slice_scores(importance, tensors: dict[str, torch.Tensor], dims: dict[str, list[int]],
                 grads: dict[str, torch.Tensor] | None, bn_weights: set[str]) -> dict[tuple[str, int], torch.Tensor]:
    """Scale-free per-index scores for each (tensor name, dim) that takes part.

    ``bn_scale`` scores only BatchNorm weights (|gamma|, network slimming); ``taylor`` scores
    |w * grad| (first-order loss change when the slice is removed); ``fpgm`` only dims that
    produce channels (given in ``dims``).
    """
    scores = {}
    for name, tensor_dims in dims.items():
        t = tensors[name].detach().float()
        for dim in tensor_dims:
            if importance == "bn_scale":
                if name not in bn_weights:
                    continue
                s = t.abs()
            elif importance == "taylor":
                s = l1(t * grads[name].float(), dim)
            elif callable(importance):
                s = torch.as_tensor(importance(tensors[name].detach(), dim), dtype=torch.float32)
                if s.shape != (t.shape[dim],):
                    raise PangkasError(f"importance callable returned shape {tuple(s.shape)} for "
                                       f"{name} dim {dim}; expected ({t.shape[dim]},)")
            else:
                s = CRITERIA[importance](t, dim)
            mean = s.mean()
            scores[(name, dim)] = s / mean if mean > 0 else s
    return scores
