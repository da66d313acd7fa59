"""``importance="taylor"``: |w * grad|, the first-order loss change when a slice is removed."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import PangkasError
from ..inputs import call_model
from ..modules import evaluating
from .base import Importance, Slice
from .l1 import l1


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


class Taylor(Importance):
    name = "taylor"
    needs_data = needs_loss = True

    def measure(self, model, data, loss_fn) -> dict[str, torch.Tensor]:
        return gradients(model, data, loss_fn)

    def score(self, piece: Slice, measured: dict[str, torch.Tensor]) -> torch.Tensor:
        return l1(piece.tensor.float() * measured[piece.name].float(), piece.dim)
