"""``importance="l2"``: the Euclidean norm of each slice."""

from __future__ import annotations

import torch

from .base import Importance, Slice


def l2(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Euclidean norm over each index of ``dim``."""
    return t.pow(2).sum([d for d in range(t.ndim) if d != dim]).sqrt() if t.ndim > 1 else t.abs()


class L2(Importance):
    name = "l2"

    def score(self, piece: Slice, measured) -> torch.Tensor:
        return l2(piece.tensor.float(), piece.dim)
