"""``importance="random"``: uniform random scores, the baseline a real criterion must beat."""

from __future__ import annotations

import torch

from .base import Importance, Scores


class Random(Importance):
    """Draws for every traced tensor dim, buffers included, in trace order: seed with
    ``torch.manual_seed`` to repeat a plan. Scores are not normalised (they are already alike)."""

    name = "random"

    def scores(self, slices, measured) -> Scores:
        return {(piece.name, piece.dim): torch.rand(piece.size) for piece in slices}
