"""``importance="obs"``: the output error a channel's removal leaves once its readers are re-fitted.

Structured Optimal Brain Surgeon (as ZipLM and SlimGPT use it, scored once): a layer that reads
channel ``j`` with weights ``W_S`` (the columns of ``j``: one for a Linear, the kernel taps for a
conv) on inputs whose Gram is ``H = X^T X`` loses, when ``j`` goes and the other columns are
re-fitted by least squares, ``tr(W_S [(H^-1)_SS]^-1 W_S^T)`` of squared output. That is exactly the
error ``reconstruct=True`` leaves for that channel alone, so the two belong together. A channel's
score is that error summed over the layers that read it; the tensors that produce it keep only a
tie-breaking say (they are scored by l1, scaled down).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..activations import InputStatistics, damped_, recording
from ..errors import PangkasError
from ..inputs import call_model
from ..modules import evaluating
from .base import Importance, Scores, Slice
from .l1 import l1

TIE_BREAK = 1e-3  # what a producing tensor's l1 weighs next to the readers' errors


def _reader(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


@torch.no_grad()
def input_grams(model: nn.Module, data: Iterable) -> dict[str, InputStatistics]:
    """``X^T X`` of every Linear's and ungrouped Conv2d's inputs on ``data``, by module (what
    :func:`inverse_hessian` turns into the OBS scores of that module's input channels)."""
    layers = {name: m for name, m in model.named_modules() if _reader(m)}
    batches = 0
    with recording(layers, gram=True) as stats, evaluating(model):
        for batch in data:
            call_model(model, batch)
            batches += 1
    if not batches:
        raise PangkasError("data= yielded no batches")
    return {name: s for name, s in stats.items() if s.total is not None}


def inverse_hessian(stats: InputStatistics) -> torch.Tensor:
    """``(X^T X / rows + ridge)^-1`` in float64."""
    h = stats.gram.double() / stats.rows
    damped_(h)
    return torch.cholesky_inverse(torch.linalg.cholesky(h))


def removal_errors(weight: torch.Tensor, hinv: torch.Tensor) -> torch.Tensor:
    """Per input channel of ``weight`` (out, in, *kernel): the squared output error of removing it
    with the other columns re-fitted, from the inverse Hessian of its (in * taps) columns."""
    out, channels = weight.shape[:2]
    taps = weight[0, 0].numel()
    w = weight.double().reshape(out, channels, taps)
    blocks = hinv.reshape(channels, taps, channels, taps).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    return torch.einsum("ocs,cst,oct->c", w, torch.linalg.inv(blocks), w).float()


class OBS(Importance):
    name = "obs"
    needs_data = True

    def measure(self, model, data, loss_fn) -> dict[str, InputStatistics]:
        return input_grams(model, data)  # inverted one layer at a time, when scored: less memory

    def score(self, piece: Slice, measured) -> torch.Tensor:
        if self._reads(piece, measured):
            return removal_errors(piece.tensor, inverse_hessian(measured[piece.module_name]))
        return l1(piece.tensor.float(), piece.dim)

    def scores(self, slices: Iterable[Slice], measured) -> Scores:
        slices = list(slices)
        result = super().scores(slices, measured)
        for piece in slices:
            if (piece.name, piece.dim) in result and not self._reads(piece, measured):
                result[(piece.name, piece.dim)] = result[(piece.name, piece.dim)] * TIE_BREAK
        return result

    @staticmethod
    def _reads(piece: Slice, measured) -> bool:
        """Whether ``piece`` is a measured layer's weight along its input channels."""
        return (piece.module_name in measured and piece.dim == 1 and piece.tensor is not None
                and piece.attribute in ("weight", "parametrizations.weight.original") and _reader(piece.module))
