"""Weight importance scores: higher means more worth keeping.

A criterion is any ``fn(weight) -> scores`` returning a float tensor of the weight's shape; the
built-ins are named here so ``method="magnitude"`` and ``method=my_fn`` go through one path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import PangkasError

Criterion = Callable[[torch.Tensor], torch.Tensor]


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    # float64 stays float64: a large finite weight must not overflow to an infinite score.
    return weight.detach().abs().to(torch.promote_types(weight.dtype, torch.float32))


def random(weight: torch.Tensor) -> torch.Tensor:
    """Uniform random scores: the baseline any real criterion must beat (seed with torch.manual_seed)."""
    return torch.rand(weight.shape, device=weight.device)


CRITERIA: dict[str, Criterion] = {"magnitude": magnitude, "random": random}


def scores_of(criterion: Criterion, weight: torch.Tensor, name: str) -> torch.Tensor:
    """``criterion(weight)`` as float scores, or PangkasError naming layer ``name`` if they are not
    finite numbers of the weight's shape (a NaN or -inf score cannot be ranked against the rest)."""
    scores = criterion(weight)
    if not isinstance(scores, torch.Tensor) or scores.shape != weight.shape:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise PangkasError(f"the criterion returned scores of shape {shape} for {name}.weight of shape "
                           f"{tuple(weight.shape)}; it must return one score per weight")
    scores = scores.detach().to(torch.promote_types(scores.dtype, torch.float32))
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        raise PangkasError(f"the criterion gave {bad} non-finite scores (NaN/inf) for {name}.weight; "
                           "scores must be finite numbers (higher = keep)")
    return scores
