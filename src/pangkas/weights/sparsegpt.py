"""``importance="sparsegpt"`` one-shot (Frantar & Alistarh 2023): row-wise OBS with the inverse
Hessian of ``X^T X``; the mask is chosen in column blocks and the kept weights are updated to
absorb the error of the removed ones.

As in the paper, an unstructured mask is chosen with one threshold across each block (rows may
keep different shares: adaptive per-row sparsity); ``SparseGPT(per_row=True)`` gives every row the
same share of each block instead. N:M masks are chosen per group of M inputs either way."""

from __future__ import annotations

import torch

from ..activations import DAMP, InputStatistics, damped_
from .criteria import CalibratedImportance, finite, row_masks
from .sparsity import extend_mask, prune_count


class SparseGPT(CalibratedImportance):
    name = "sparsegpt"
    gram = True

    def __init__(self, per_row: bool = False):
        self.per_row = per_row

    def prune_rows(self, weight: torch.Tensor, inputs: InputStatistics, old, sparsity, n_m):
        return sparsegpt(weight, inputs.gram / inputs.rows, old, sparsity, n_m, per_row=self.per_row)


def _block_mask(score: torch.Tensor, old: torch.Tensor | None, sparsity: float, per_row: bool) -> torch.Tensor:
    """Keep-mask of one column block: one threshold across it, or the same share per row."""
    if per_row:
        return row_masks(score, old, sparsity, None)
    keep = extend_mask(score.flatten(), None if old is None else old.flatten(), prune_count(score.numel(), sparsity))
    return keep.view(score.shape)


def _group_prune(score: torch.Tensor, old: torch.Tensor | None, n: int) -> torch.Tensor:
    """Prune-mask of one group of columns: all but each row's ``n`` best of those ``old`` keeps
    (``row_masks``'s N:M rule, written for one group: it runs once per group of m columns)."""
    if old is not None:
        score = score.masked_fill(~old, float("-inf"))  # already pruned: lowest, so dropped first
    prune = torch.zeros_like(score, dtype=torch.bool)
    drop = score.shape[1] - n
    if drop > 0:
        prune.scatter_(1, torch.topk(score, drop, dim=1, largest=False).indices, True)
    return prune if old is None else prune | ~old


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, old: torch.Tensor | None,
              sparsity: float | None, n_m: tuple[int, int] | None, block: int = 128,
              damp: float = DAMP, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight, keep mask) of one layer's (rows, inputs) weight, SparseGPT's algorithm."""
    w = weight.clone()
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    damped_(h, damp)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    keep = torch.ones_like(w, dtype=torch.bool)
    columns = w.shape[1]
    for start in range(0, columns, block):
        end = min(start + block, columns)
        w1, hinv1 = w[:, start:end].clone(), hinv[start:end, start:end]
        err = torch.zeros_like(w1)
        diag2 = torch.diag(hinv1).pow(2)[None, :]
        if n_m is None:
            score = finite(w1.pow(2) / diag2, "SparseGPT scores")
            prune = ~_block_mask(score, None if old is None else old[:, start:end], sparsity, per_row)
        else:
            prune = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(end - start):
            column, d = w1[:, i], hinv1[i, i]
            if n_m is not None and i % n_m[1] == 0:
                span = slice(i, min(i + n_m[1], end - start))
                # Not checked for NaN/inf group by group (a sync each): the updated weights are, at the end.
                score = w1[:, span].pow(2) / diag2[:, span]
                prune[:, span] = _group_prune(score, None if old is None else old[:, start + i:start + span.stop],
                                              n_m[0])
            q = column.masked_fill(prune[:, i], 0.0)
            e = (column - q) / d
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            w1[:, i] = q
            err[:, i] = e
        w[:, start:end] = w1
        keep[:, start:end] = ~prune
        w[:, end:] -= err @ hinv[start:end, end:]
    return w, keep
