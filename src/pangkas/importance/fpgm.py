"""``importance="fpgm"``: filter pruning via geometric median (He et al. 2019)."""

from __future__ import annotations

import torch

from .base import Importance, Slice


def fpgm(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Each filter's summed distance to the layer's other filters: one close to all the others
    is replaceable."""
    flat = t.movedim(dim, 0).reshape(t.shape[dim], -1)
    return torch.cdist(flat[None], flat[None])[0].sum(1)


class FPGM(Importance):
    """Scores only the dims that create channels (filters); the tensors reading them have no say."""

    name = "fpgm"

    def score(self, piece: Slice, measured) -> torch.Tensor | None:
        if piece.tensor.ndim < 2 or not piece.produces:
            return None
        return fpgm(piece.tensor.float(), piece.dim)
