"""How far a model's outputs are from what they were: the yardsticks of searches that change it.

``Distortion`` (lower is better) is what allocation and the compress search minimise: the KL
divergence of the predictions where the model has ``logits``, else the relative squared error of
its output. ``Fidelity`` (higher is better, 1.0 = unchanged) is what a compressed model is judged
by when the user gives no ``eval_fn``: the mean cosine similarity of each example's output to the
dense model's, on held-back batches.
"""

from __future__ import annotations

import torch
from torch import nn

from .inputs import call_model
from .modules import evaluating
from .outputs import primary_tensor


@torch.no_grad()
def _output(model: nn.Module, batch) -> tuple[torch.Tensor, bool]:
    """The model's primary output on ``batch`` as float, and whether it is logits."""
    with evaluating(model):
        output = call_model(model, batch)
    return primary_tensor(output).float(), isinstance(getattr(output, "logits", None), torch.Tensor)


class Distortion:
    """``distortion()``: how far ``model``'s outputs on ``batches`` are from what they were when
    this was made (0.0 = the same), averaged over the batches."""

    def __init__(self, model: nn.Module, batches: list):
        self.model, self.batches = model, batches
        self.reference = [self._output(b) for b in batches]

    def _output(self, batch) -> tuple[torch.Tensor, bool]:
        y, logits = _output(self.model, batch)
        return (torch.log_softmax(y, dim=-1) if logits else y), logits

    def __call__(self) -> float:
        total = 0.0
        for batch, (y0, logits) in zip(self.batches, self.reference):
            y, _ = self._output(batch)
            if logits:  # KL(dense || now), per position
                total += float((y0.exp() * (y0 - y)).sum(-1).mean())
            else:
                total += float((y - y0).pow(2).sum() / y0.pow(2).sum().clamp_min(1e-30))
        return total / len(self.batches)


class Fidelity:
    """``fidelity(model)``: the mean over examples (dim 0 of each batch) of the cosine similarity
    between ``model``'s flattened primary output and ``reference_model``'s, on ``batches``."""

    def __init__(self, reference_model: nn.Module, batches: list):
        self.batches = batches
        self.reference = [_output(reference_model, b)[0] for b in batches]

    def __call__(self, model: nn.Module) -> float:
        total, count = 0.0, 0
        for batch, y0 in zip(self.batches, self.reference):
            y = _output(model, batch)[0]
            if y.shape != y0.shape:
                return float("nan")
            cos = nn.functional.cosine_similarity(y.flatten(1) if y.ndim > 1 else y[:, None],
                                                  y0.flatten(1) if y0.ndim > 1 else y0[:, None], dim=1)
            total += float(cos.sum())
            count += cos.numel()
        return total / count
