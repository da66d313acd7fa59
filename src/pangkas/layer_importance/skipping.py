"""``importance="loss"`` / ``"metric"``: skip each block in turn and watch the user's score."""

from __future__ import annotations

import torch

from ..errors import PangkasError
from ..inputs import call_model
from ..progress import track
from .base import LayerImportance, nested
from .states import input_tensor


def skipping(model, names: list[str]):
    """Forward hooks that make blocks return their input (the block as if deleted)."""
    def hook(module, args, kwargs, output):
        x = input_tensor(args, kwargs)
        return (x,) + tuple(output[1:]) if isinstance(output, tuple) else x

    return [model.get_submodule(n).register_forward_hook(hook, with_kwargs=True) for n in names]


def _evaluate(model, data, fn) -> float:
    total, batches = 0.0, 0
    with torch.no_grad():
        for batch in data:
            total += float(fn(call_model(model, batch), batch))
            batches += 1
    return total / batches


def greedy(model, candidates, data, n: int, fn, higher_is_better: bool) -> tuple[list[str], dict[str, float]]:
    """Remove, n times, the block whose skipping hurts ``fn`` least, re-scoring after each.

    Returns the chosen blocks and each candidate's score from the first round (the change of
    ``fn`` when that block alone is skipped; positive = worse)."""
    sign = -1.0 if higher_is_better else 1.0
    chosen: list[str] = []
    first: dict[str, float] = {}
    handles = []
    try:
        for step in range(n):
            base = _evaluate(model, data, fn)
            scores = {}
            pool = [c for c in candidates if not any(nested(c.name, done) for done in chosen)]
            if not pool:
                raise PangkasError(f"only {len(chosen)} blocks can be removed together (the others nest in them)")
            for c in track(pool, f"scoring blocks ({step + 1}/{n})"):
                trial = skipping(model, [c.name])
                try:
                    scores[c.name] = sign * (_evaluate(model, data, fn) - base)
                finally:
                    for h in trial:
                        h.remove()
            first = first or scores
            best = min(scores, key=scores.get)
            chosen.append(best)
            handles += skipping(model, [best])
    finally:
        for h in handles:
            h.remove()
    return chosen, first


class Loss(LayerImportance):
    """``loss_fn(output, batch)`` rises least when the block alone is skipped; greedy, re-scored
    after each removal."""

    name = "loss"
    needs_loss = True

    def choose(self, model, candidates, data, n, *, loss_fn=None, metric_fn=None):
        chosen, scores = greedy(model, candidates, data, n, loss_fn, higher_is_better=False)
        return scores, chosen


class Metric(LayerImportance):
    """As ``"loss"``, with ``metric_fn(output, batch)`` (higher is better)."""

    name = "metric"
    needs_metric = True

    def choose(self, model, candidates, data, n, *, loss_fn=None, metric_fn=None):
        chosen, scores = greedy(model, candidates, data, n, metric_fn, higher_is_better=True)
        return scores, chosen
