"""``importance="l1"``: the summed magnitude of each slice (the default)."""

from __future__ import annotations

import torch

from .base import Importance, Slice


def l1(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of |w| over each index of ``dim``."""
    return t.abs().sum([d for d in range(t.ndim) if d != dim]) if t.ndim > 1 else t.abs()


class L1(Importance):
    name = "l1"

    def score(self, piece: Slice, measured) -> torch.Tensor:
        return l1(piece.tensor.float(), piece.dim)
