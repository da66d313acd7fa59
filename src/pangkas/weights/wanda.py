"""``importance="wanda"`` one-shot (Sun et al. 2023): drop the weights with the smallest
``|W_ij| * ||X_j||`` in each output row; the kept weights stay as they are."""

from __future__ import annotations

import torch

from ..activations import InputStatistics, wanda_scores
from .criteria import CalibratedImportance, finite, row_masks


class Wanda(CalibratedImportance):
    name = "wanda"

    def prune_rows(self, weight: torch.Tensor, inputs: InputStatistics, old, sparsity, n_m):
        scores = finite(wanda_scores(weight, inputs.norms(), 1), "Wanda scores (|w| x input norm)")
        return None, row_masks(scores, old, sparsity, n_m)
