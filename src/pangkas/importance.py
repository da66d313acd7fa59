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
NAMES = ("l1", "l2", "fpgm", "bn_scale", "taylor", "wanda", "random")


def check(importance, data, loss_fn) -> None:
    if callable(importance):
        return
    if importance not in NAMES:
        raise PangkasError(f"importance must be one of {list(NAMES)} or a callable fn(tensor, dim), "
                           f"got {importance!r}")
    if importance == "taylor" and (data is None or loss_fn is None):
        raise PangkasError("importance='taylor' needs data= (batches) and loss_fn=(output, batch) -> loss")
    if importance == "wanda" and data is None:
        raise PangkasError("importance='wanda' needs data= (calibration batches) to measure activations")


@torch.no_grad()
def input_norms(model: nn.Module, data: Iterable) -> dict[str, tuple[torch.Tensor, int]]:
    """For every Linear (and GPT-2 Conv1D) by its module name: the L2 norm of each input
    feature over all calibration tokens (Wanda's ||X_j||), and which weight dim reads inputs."""
    sums: dict[str, torch.Tensor] = {}
    reads: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            reads[name] = 1 if isinstance(module, nn.Linear) else 0  # Conv1D's weight is (in, out)

            def hook(mod, args, name=name):
                x = args[0].detach().float()
                sums[name] = sums.get(name, 0) + x.reshape(-1, x.shape[-1]).pow(2).sum(0)

            hooks.append(module.register_forward_pre_hook(hook))
    batches = 0
    try:
        with evaluating(model):
            for batch in data:
                call_model(model, batch)
                batches += 1
    finally:
        for h in hooks:
            h.remove()
    if not batches:
        raise PangkasError("data= yielded no batches")
    return {name: (total.sqrt(), reads[name]) for name, total in sums.items()}


def wanda(t: torch.Tensor, dim: int, norms: torch.Tensor, input_dim: int) -> torch.Tensor:
    """Wanda (Sun et al. 2023): |W_ij| * ||X_j|| summed over the slice (weights whose input
    features are large matter more)."""
    shape = [1] * t.ndim
    shape[input_dim] = -1
    return l1(t.abs() * norms.reshape(shape).to(t.device), dim)


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
                 grads: dict[str, torch.Tensor] | None, bn_weights: set[str],
                 norms: dict[str, tuple[torch.Tensor, int]] | None = None) -> dict[tuple[str, int], torch.Tensor]:
    """Scale-free per-index scores for each (tensor name, dim) that takes part.

    ``bn_scale`` scores only BatchNorm weights (|gamma|, network slimming); ``taylor`` scores
    |w * grad| (first-order loss change when the slice is removed); ``wanda`` scores weights by
    |w| times their input's activation norm (``norms``: name -> (norms, input dim)), other
    tensors by l1; ``fpgm`` only dims that produce channels (given in ``dims``).
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
            elif importance == "wanda":
                s = wanda(t, dim, *norms[name]) if name in norms else l1(t, dim)
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
