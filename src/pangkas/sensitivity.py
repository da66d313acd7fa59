"""Sensitivity analysis: how much each layer (or channel group) can lose.

Each unit is pruned alone over a sweep of ratios while the rest of the model stays dense, and a
user metric is recorded. Channel groups are pruned by silencing: zeroing the input weights of
the lowest-importance channels of that group, which the equivalence oracle shows is exactly what
removing them does (exact groups only), with no surgery and no copies. Weights are pruned by
temporarily zeroing the smallest of one layer. The result becomes per-layer ``ratios=`` for a
target overall ratio.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import PangkasError
from .files import pyplot, write_figure
from .progress import track
from .tables import render_table

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class Sensitivity:
    """Metric per unit per ratio; ``baseline`` is the dense model's metric."""

    kind: str
    ratios: tuple[float, ...]
    baseline: float
    metrics: dict[str, list[float]]
    sizes: dict[str, int]  # parameters (weights) or channels (groups) per unit
    higher_is_better: bool = True

    def drops(self, unit: str) -> list[float]:
        sign = 1 if self.higher_is_better else -1
        return [sign * (self.baseline - m) for m in self.metrics[unit]]

    def __str__(self) -> str:
        rows = [(unit, *(f"{m:.4g}" for m in values)) for unit, values in self.metrics.items()]
        return render_table(f"sensitivity ({self.kind}), baseline {self.baseline:.4g}",
                            ("unit", *(f"{r:.0%}" for r in self.ratios)), rows)

    def plot(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Draw the metric against the ratio per unit; an existing file is replaced only with
        ``overwrite=True``."""
        plt = pyplot()

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for unit, values in self.metrics.items():
            ax.plot([r * 100 for r in self.ratios], values, marker=".", label=unit)
        ax.axhline(self.baseline, color="black", linestyle=":", label="dense")
        ax.set_xlabel(f"{self.kind} removed from this unit alone (%)")
        ax.set_ylabel("metric")
        if len(self.metrics) <= 12:
            ax.legend(fontsize="small")
        fig.tight_layout()
        return write_figure(fig, path, overwrite=overwrite)

    def ratios_for(self, target: float) -> dict[str, float]:
        """Per-unit ratios whose size-weighted mean is about ``target``: every unit goes as far as
        it can while its own metric drop stays under one common tolerance, found by bisection."""
        if not 0 < target < max(self.ratios):
            raise PangkasError(f"target must be in (0, {max(self.ratios)}), got {target!r}")

        def allocate(tolerance: float) -> dict[str, float]:
            chosen = {}
            for unit in self.metrics:
                ok = [r for r, d in zip(self.ratios, self.drops(unit)) if d <= tolerance]
                chosen[unit] = max(ok) if ok else 0.0
            return chosen

        def mean(chosen):
            total = sum(self.sizes.values())
            return sum(chosen[u] * self.sizes[u] for u in chosen) / total

        drops = sorted({d for u in self.metrics for d in self.drops(u)} | {0.0})
        low, high = 0, len(drops) - 1
        while low < high:  # smallest tolerance reaching the target
            mid = (low + high) // 2
            if mean(allocate(drops[mid])) >= target:
                high = mid
            else:
                low = mid + 1
        return allocate(drops[low])


def _check(ratios, eval_fn) -> tuple[float, ...]:
    if not callable(eval_fn):
        raise PangkasError("eval_fn must be a callable: eval_fn(model) -> metric")
    ratios = tuple(ratios)
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise PangkasError(f"ratios must be in (0, 1), got {ratios}")
    return ratios


@torch.no_grad()
def sensitivity(model: nn.Module, eval_fn: Callable[[nn.Module], float], *, kind: str = "channels",
                example_inputs=None, ratios: Sequence[float] = RATIOS, importance="l1",
                higher_is_better: bool = True, include=None, exclude=None, data=None,
                loss_fn=None) -> Sensitivity:
    """Prune one unit at a time over ``ratios`` and record ``eval_fn(model)`` (a whole-model
    score, higher is better unless ``higher_is_better=False``).

    ``kind="channels"``: units are the coupled channel groups of ``plan_channels`` (needs
    ``example_inputs``; ``importance``, ``data``, ``loss_fn``, ``include`` and ``exclude`` go to
    it), named by their first producing module; ``kind="weights"``: units are the Linear and
    convolution layers (``include`` / ``exclude`` select them). The model is left as it was.
    """
    ratios = _check(ratios, eval_fn)
    baseline = float(eval_fn(model))
    if kind == "channels":
        if example_inputs is None:
            raise PangkasError("kind='channels' needs example_inputs= to find the channel groups")
        options = dict(importance=importance, include=include, exclude=exclude, data=data, loss_fn=loss_fn)
        metrics, sizes = _channel_sweep(model, eval_fn, example_inputs, ratios, options)
    elif kind == "weights":
        metrics, sizes = _weight_sweep(model, eval_fn, ratios, include, exclude)
    else:
        raise PangkasError(f"kind must be 'channels' or 'weights', got {kind!r}")
    return Sensitivity(kind, ratios, baseline, metrics, sizes, higher_is_better)


def _channel_sweep(model, eval_fn, example_inputs, ratios, options):
    from .channels import plan_channels
    from .silence import lowest_removed, restore, silence_removed

    plan = plan_channels(model, example_inputs, ratio=0.0, **options)
    metrics, sizes = {}, {}
    for group in track([g for g in plan.selection.groups if len(g.classes) > 1], "sensitivity: channel groups"):
        name = group.modules[0] if group.modules else f"group of {len(group.classes)}"
        values = []
        for r in ratios:
            n = min(round(r * len(group.classes)), len(group.classes) - 1)
            saved = silence_removed(plan, lowest_removed(plan, group, n))
            try:
                values.append(float(eval_fn(model)))
            finally:
                restore(saved)
        metrics[name], sizes[name] = values, len(group.classes)
    return metrics, sizes


def _weight_sweep(model, eval_fn, ratios, include, exclude):
    from .modules import select_modules
    from .weights.masks import underlying_parameter
    from .weights.prune import PRUNABLE
    from .weights.sparsity import lowest_mask, prune_count

    metrics, sizes = {}, {}
    for name, module in track(select_modules(model, PRUNABLE, include, exclude), "sensitivity: layers"):
        weight = underlying_parameter(module)  # under a mask, the mask still applies on top
        original = weight.detach().clone()
        magnitude = module.weight.detach().abs()
        values = []
        try:
            for r in ratios:
                keep = lowest_mask(magnitude, prune_count(original.numel(), r))
                weight.copy_(torch.where(keep, original, 0.0))
                values.append(float(eval_fn(model)))
        finally:
            weight.copy_(original)
        unit = name or type(module).__name__
        metrics[unit], sizes[unit] = values, original.numel()
    return metrics, sizes
