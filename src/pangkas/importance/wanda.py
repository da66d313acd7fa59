"""``importance="wanda"``: |w| x the norm of the input it reads (Sun et al. 2023), per slice."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..activations import recording, wanda_scores
from ..errors import PangkasError
from ..inputs import call_model
from ..modules import evaluating
from .base import Importance, Slice
from .l1 import l1


def _reads_tokens(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's Conv1D


@torch.no_grad()
def input_norms(model: nn.Module, data: Iterable) -> dict[str, tuple[torch.Tensor, int]]:
    """For every Linear (and GPT-2 Conv1D) that ``data`` reaches, by module name: each input
    feature's L2 norm over all calibration tokens (Wanda's ||X_j||), and which weight dim reads
    inputs."""
    layers = {name: m for name, m in model.named_modules() if _reads_tokens(m)}
    batches = 0
    with recording(layers) as stats, evaluating(model):
        for batch in data:
            call_model(model, batch)
            batches += 1
    if not batches:
        raise PangkasError("data= yielded no batches")
    return {name: (s.norms(), 1 if isinstance(layers[name], nn.Linear) else 0)  # Conv1D's weight is (in, out)
            for name, s in stats.items() if s.total is not None}


class Wanda(Importance):
    """Weights of the measured layers score |w| x input norm; every other tensor scores l1."""

    name = "wanda"
    needs_data = True

    def measure(self, model, data, loss_fn) -> dict[str, tuple[torch.Tensor, int]]:
        return input_norms(model, data)

    def score(self, piece: Slice, measured) -> torch.Tensor:
        t = piece.tensor.float()
        # a masked weight's original is the weight
        if piece.module_name in measured and piece.name.endswith(("weight", "weight.original")):
            return l1(wanda_scores(t, *measured[piece.module_name]), piece.dim)
        return l1(t, piece.dim)
