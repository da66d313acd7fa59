"""``importance="magnitude"``: mean |w| of a block, the baseline that reads no data."""

from __future__ import annotations

import torch

from .base import LayerImportance, Scores


def magnitude(model, candidates) -> Scores:
    """Mean |w| of a block's parameters: the baseline any data-driven criterion must beat."""
    scores = {}
    for c in candidates:
        params = [p.detach().abs().float() for p in model.get_submodule(c.name).parameters()]
        scores[c.name] = float(torch.cat([p.flatten() for p in params]).mean()) if params else 0.0
    return scores


class Magnitude(LayerImportance):
    name = "magnitude"
    needs_data = False

    def scores(self, model, candidates, data, *, loss_fn=None, metric_fn=None) -> Scores:
        return magnitude(model, candidates)
