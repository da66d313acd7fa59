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
    # The algorithm walks the inputs one at a time: it works on the transpose, where one input's
    # weights are a contiguous row (twice as fast per step, and the same floats as on columns).
    wt = weight.T.clone(memory_format=torch.contiguous_format)
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    wt[dead] = 0
    damped_(h, damp)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    drop = torch.zeros_like(wt, dtype=torch.bool)  # (inputs, rows), as wt
    columns = wt.shape[0]
    for start in range(0, columns, block):
        end = min(start + block, columns)
        w1, hinv1, drop1 = wt[start:end], hinv[start:end, start:end], drop[start:end]
        err = torch.zeros_like(w1)
        diag2 = torch.diag(hinv1).pow(2)[None, :]
        if n_m is None:
            score = finite(w1.T.pow(2) / diag2, "SparseGPT scores")
            drop1.copy_(~_block_mask(score, None if old is None else old[:, start:end], sparsity, per_row).T)
        for i in range(end - start):
            if n_m is not None and i % n_m[1] == 0:
                span = slice(i, min(i + n_m[1], end - start))
                # Not checked for NaN/inf group by group (a sync each): the updated weights are, at the end.
                score = w1[span].T.pow(2) / diag2[:, span]
                drop1[span] = _group_prune(score, None if old is None else old[:, start + i:start + span.stop],
                                           n_m[0]).T
            row = w1[i]
            q = row.masked_fill(drop1[i], 0.0)
            e = (row - q) / hinv1[i, i]
            w1[i:] -= hinv1[i, i:, None] * e[None, :]
            w1[i] = q
            err[i] = e
        wt[end:] -= hinv[start:end, end:].T @ err
    return wt.T.contiguous(), ~drop.T.contiguous()
