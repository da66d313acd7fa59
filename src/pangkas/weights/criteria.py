"""How ``prune_weights`` ranks single weights (``importance=``): higher means more worth keeping.

Two kinds, one registry:

- :class:`WeightImportance`: ``scores(weight)`` gives one score per weight, and the mask rule
  (sparsity, N:M, global) cuts the lowest (``"magnitude"``, ``"random"``; a plain
  ``fn(weight) -> scores`` becomes one).
- :class:`CalibratedImportance`: one-shot from calibration ``data=``; gets a layer's weight and
  the statistics of its inputs, block by block, and returns the keep-mask itself (and possibly
  updated weights): ``"wanda"``, ``"sparsegpt"``.

Adding one is a small file plus ``pangkas.weights.criteria.register(MyCriterion())``; it is then
usable as ``prune_weights(importance="my_name")``, or pass the object itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..activations import InputStatistics
from ..errors import PangkasError
from ..registry import Registry
from . import sparsity as rules


class WeightImportance:
    """A per-weight criterion: subclass, set ``name``, implement :meth:`scores`."""

    name: str = ""
    needs_data: bool = False  # needs data= (calibration batches)

    def scores(self, weight: torch.Tensor) -> torch.Tensor:
        """One float score per weight, the weight's shape (higher = keep)."""
        raise NotImplementedError(f"{type(self).__name__} must implement scores(weight)")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} importance {self.name!r}>"

    def __str__(self) -> str:
        return self.name  # how reports name it: importance=magnitude


class CalibratedImportance(WeightImportance):
    """A one-shot criterion that prunes each layer from what it reads on ``data=``: subclass,
    set ``name`` and ``gram`` (``True``: it needs ``X^T X``; else per-feature sums of squares),
    implement :meth:`prune_rows`. Each output row loses its share (``sparsity`` or N:M)."""

    needs_data = True
    gram: bool = False

    def prune_rows(self, weight: torch.Tensor, inputs: InputStatistics, old: torch.Tensor | None,
                   sparsity: float | None, n_m: tuple[int, int] | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(updated weight or None, keep mask) of a (rows, inputs) float ``weight`` whose inputs
        had the statistics ``inputs``; ``old`` is its current keep mask (stays pruned), if any.
        ``weight`` may share the layer's memory: read it, never write into it."""
        raise NotImplementedError(f"{type(self).__name__} must implement prune_rows(...)")


def finite(values: torch.Tensor, what: str) -> torch.Tensor:
    """``values``, or PangkasError if any is NaN/inf (calibrated scores inherit bad activations)."""
    if not torch.isfinite(values).all():
        raise PangkasError(f"{what} are not finite (NaN/inf); check the calibration data= "
                           "(NaN/inf inputs, or activations that overflow)")
    return values


def row_masks(scores: torch.Tensor, old: torch.Tensor | None, sparsity: float | None,
              n_m: tuple[int, int] | None) -> torch.Tensor:
    """Keep-mask of a (rows, inputs) score matrix: N:M along the inputs, or the same share per row."""
    if n_m is not None:
        return rules.extend_n_m(scores, old, *n_m, dim=1)
    return rules.extend_row_masks(scores, old, rules.prune_count(scores.shape[1], sparsity))


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    # float64 stays float64: a large finite weight must not overflow to an infinite score.
    return weight.detach().abs().to(torch.promote_types(weight.dtype, torch.float32))


def random(weight: torch.Tensor) -> torch.Tensor:
    """Uniform random scores: the baseline any real criterion must beat (seed with torch.manual_seed)."""
    return torch.rand(weight.shape, device=weight.device)


class FromFunction(WeightImportance):
    """A plain ``fn(weight) -> scores`` as a criterion."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn
        self.name = getattr(fn, "__name__", "custom")

    def scores(self, weight: torch.Tensor) -> torch.Tensor:
        return self.fn(weight)


class Magnitude(FromFunction):
    """|w|, the default."""

    def __init__(self):
        super().__init__(magnitude)


class Random(FromFunction):
    def __init__(self):
        super().__init__(random)


CRITERIA: Registry[WeightImportance] = Registry("weight importance", WeightImportance, FromFunction,
                                                "fn(weight) -> scores")
register, unregister, names, resolve = CRITERIA.register, CRITERIA.unregister, CRITERIA.names, CRITERIA.resolve


def scores_of(criterion: WeightImportance, weight: torch.Tensor, name: str) -> torch.Tensor:
    """``criterion``'s scores of ``weight`` as floats, or PangkasError naming layer ``name`` if they
    are not finite numbers of the weight's shape (a NaN or -inf score cannot be ranked)."""
    scores = criterion.scores(weight)
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
