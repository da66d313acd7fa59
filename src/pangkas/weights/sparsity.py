"""Turning scores into keep-masks: local, global, threshold and N:M rules.

Pure functions of tensors. Entries already pruned are given by the old keep-mask, never by a score
value (a ``-inf`` score is an error upstream, not a marker), so a new mask never resurrects them.
"""

from __future__ import annotations

import torch


def prune_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a sparsity removes: ``round(sparsity * numel)``, halves to even."""
    return round(sparsity * numel)


def lowest_mask(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep-mask that removes exactly the ``n_prune`` lowest scores (ties broken by position)."""
    flat = scores.flatten()
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_prune > 0:
        keep[torch.topk(flat, n_prune, largest=False, sorted=False).indices] = False
    return keep.view(scores.shape)


def extend_mask(scores: torch.Tensor, old: torch.Tensor | None, n_prune: int) -> torch.Tensor:
    """Keep-mask pruning what ``old`` prunes plus the lowest-scoring entries it keeps, ``n_prune``
    in all (only ``old``'s if it already prunes more)."""
    if old is None:
        return lowest_mask(scores, n_prune)
    keep = old.clone()
    more = n_prune - int((~old).sum())
    if more > 0:
        keep[old] = lowest_mask(scores[old], more)
    return keep


def extend_row_masks(scores: torch.Tensor, old: torch.Tensor | None, n_prune: int) -> torch.Tensor:
    """:func:`extend_mask` of every row of a 2-D ``scores`` at once (one ``topk`` for the matrix,
    not one per row: Wanda's rows number in the thousands per layer)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if old is not None:
        # -inf ranks the already pruned first, so a row's n_prune lowest include all of them
        # when it has fewer; when it has more, ``& old`` keeps exactly old's (as extend_mask).
        scores = scores.masked_fill(~old, float("-inf"))
    if n_prune > 0:
        keep.scatter_(1, torch.topk(scores, n_prune, dim=1, largest=False, sorted=False).indices, False)
    return keep if old is None else keep & old


def global_masks(scores: list[torch.Tensor], old_masks: list, sparsity: float) -> list[torch.Tensor]:
    """One cut across all tensors: every kept score is >= every newly pruned score."""
    flat = torch.cat([s.flatten().cpu() for s in scores])
    old = torch.cat([torch.ones(s.numel(), dtype=torch.bool) if o is None else o.flatten().cpu()
                     for s, o in zip(scores, old_masks)])
    keep = extend_mask(flat, old, prune_count(flat.numel(), sparsity))
    return [k.view(s.shape).to(s.device) for k, s in zip(keep.split([s.numel() for s in scores]), scores)]


def threshold_mask(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """The source document's rule: keep ``|w| > threshold``."""
    return weight.detach().abs() > threshold


def n_m_mask(scores: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """Keep the ``n`` best of every ``m`` consecutive entries along ``dim`` (the input dimension).

    A last group shorter than ``m`` (dim not divisible by m) also keeps at most ``n``.
    """
    moved = scores.movedim(dim, -1)
    length = moved.shape[-1]
    pad = (-length) % m
    # No pad when none is needed: SparseGPT calls this once per group of m columns.
    padded = torch.nn.functional.pad(moved, (0, pad), value=float("-inf")) if pad else moved
    groups = padded.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, torch.topk(groups, n, dim=1).indices, True)
    keep = keep.view(padded.shape)[..., :length]
    return keep.movedim(-1, dim)


def extend_n_m(scores: torch.Tensor, old: torch.Tensor | None, n: int, m: int, dim: int) -> torch.Tensor:
    """N:M keep-mask over the entries ``old`` keeps; a group with fewer than n of them keeps those."""
    if old is None:
        return n_m_mask(scores, n, m, dim)
    # -inf only ranks pruned entries last within their group; ``& old`` is what keeps them pruned.
    return n_m_mask(scores.masked_fill(~old, float("-inf")), n, m, dim) & old
