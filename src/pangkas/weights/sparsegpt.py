"""``importance="sparsegpt"`` one-shot (Frantar & Alistarh 2023): row-wise OBS with the inverse
Hessian of ``X^T X``; the mask is chosen in column blocks and the kept weights are updated to
absorb the error of the removed ones."""

from __future__ import annotations

import torch

from ..activations import InputStatistics
from .criteria import CalibratedImportance, finite, row_masks


class SparseGPT(CalibratedImportance):
    name = "sparsegpt"
    gram = True

    def prune_rows(self, weight: torch.Tensor, inputs: InputStatistics, old, sparsity, n_m):
        return sparsegpt(weight, inputs.gram / inputs.rows, old, sparsity, n_m)


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, old: torch.Tensor | None,
              sparsity: float | None, n_m: tuple[int, int] | None, block: int = 128,
              damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight, keep mask) of one layer's (rows, inputs) weight, SparseGPT's algorithm."""
    w = weight.clone()
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(len(h))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    keep = torch.ones_like(w, dtype=torch.bool)
    columns = w.shape[1]
    for start in range(0, columns, block):
        end = min(start + block, columns)
        w1, hinv1 = w[:, start:end].clone(), hinv[start:end, start:end]
        err = torch.zeros_like(w1)
        if n_m is None:
            score = finite(w1.pow(2) / torch.diag(hinv1).pow(2)[None, :], "SparseGPT scores")
            prune = ~row_masks(score, None if old is None else old[:, start:end], sparsity, None)
        else:
            prune = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(end - start):
            column, d = w1[:, i], hinv1[i, i]
            if n_m is not None and i % n_m[1] == 0:
                span = slice(i, min(i + n_m[1], end - start))
                score = finite(w1[:, span].pow(2) / torch.diag(hinv1)[span].pow(2)[None, :], "SparseGPT scores")
                prune[:, span] = ~row_masks(score, None if old is None else old[:, start:end][:, span], None, n_m)
            q = column.clone()
            q[prune[:, i]] = 0
            e = (column - q) / d
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            w1[:, i] = q
            err[:, i] = e
        w[:, start:end] = w1
        keep[:, start:end] = ~prune
        w[:, end:] -= err @ hinv[start:end, end:]
    return w, keep
