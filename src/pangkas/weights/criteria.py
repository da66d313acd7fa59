"""Weight importance scores: higher means more worth keeping.

A criterion is any ``fn(weight) -> scores`` returning a float tensor of the weight's shape; the
built-ins are named here so ``method="magnitude"`` and ``method=my_fn`` go through one path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Criterion = Callable[[torch.Tensor], torch.Tensor]


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


def random(weight: torch.Tensor) -> torch.Tensor:
    """Uniform random scores: the baseline any real criterion must beat (seed with torch.manual_seed)."""
    return torch.rand(weight.shape, device=weight.device)


CRITERIA: dict[str, Criterion] = {"magnitude": magnitude, "random": random}
