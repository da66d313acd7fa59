"""Turning scores into keep-masks: local, global, threshold and N:M rules.

Pure functions of tensors. Entries already pruned arrive with score ``-inf``, so they are always
the first to go and a new mask never resurrects them.
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


def local_masks(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Each tensor loses ``prune_count(numel, sparsity)`` entries, or keeps its current pruning if more."""
    masks = []
    for s in scores:
        already = int(torch.isneginf(s).sum())
        masks.append(lowest_mask(s, max(prune_count(s.numel(), sparsity), already)))
    return masks


def global_masks(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """One cut across all tensors: every kept score is >= every pruned score."""
    flat = torch.cat([s.flatten().cpu() for s in scores])
    already = int(torch.isneginf(flat).sum())
    keep = lowest_mask(flat, max(prune_count(flat.numel(), sparsity), already))
    sizes = [s.numel() for s in scores]
    return [k.view(s.shape).to(s.device) for k, s in zip(keep.split(sizes), scores)]


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
    padded = torch.nn.functional.pad(moved, (0, pad), value=float("-inf"))
    groups = padded.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, torch.topk(groups, n, dim=1).indices, True)
    keep = keep.view(padded.shape)[..., :length]
    return keep.movedim(-1, dim)
