"""``importance="block_influence"`` (the default): how much a block changes its hidden state."""

from __future__ import annotations

from ..progress import track
from .base import LayerImportance, Scores
from .states import cosine, hidden_states


def block_influence(model, candidates, data) -> Scores:
    """1 - cos(input, output) of each block (ShortGPT's Block Influence): low = the block barely
    changes its hidden state."""
    total = {c.name: 0.0 for c in candidates}
    batches = 0
    for batch, states in hidden_states(model, candidates, data):
        for name, (x, y) in states.items():
            total[name] += 1 - float(cosine(x, y, batch))
        batches += 1
    return {name: s / batches for name, s in total.items()}


class BlockInfluence(LayerImportance):
    name = "block_influence"

    def scores(self, model, candidates, data, *, loss_fn=None, metric_fn=None) -> Scores:
        return block_influence(model, candidates, track(data, "scoring blocks"))
