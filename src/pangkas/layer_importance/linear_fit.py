"""``importance="linear_fit"``: how much of a block's output no affine map of its input explains.

Block influence asks how far a block is from doing nothing; with ``replace="linear"`` a removed
block is stood in for by a fitted map, so what matters is how far it is from a *linear* map.
Measured on the pretrained MiniLM (benchmarks/layers.py) this picks the pair whose stand-ins keep
the embeddings closest of all 15 (0,3), where block influence picks (1,2).
"""

from __future__ import annotations

from ..activations import DAMP, AffineFit
from ..errors import PangkasError
from ..progress import track
from .base import LayerImportance, Scores
from .states import hidden_states, real_tokens


def linear_fit(model, candidates, data, damp: float = DAMP) -> Scores:
    """``||Y - T(X)||^2 / ||Y||^2`` of each block on the (real tokens of the) batches, ``T`` the
    ridge least-squares affine map from its input ``X`` to its output ``Y`` (one forward pass;
    a ``(width + 1)^2`` float64 Gram per block)."""
    flat = [c.name for c in candidates if len(c.shape) > 3]
    if flat:
        raise PangkasError(f"importance='linear_fit' fits maps of hidden states with features last "
                           f"(tokens); {flat[:3]} pass {len(candidates[0].shape)}-d feature maps")
    fits = {c.name: AffineFit() for c in candidates}
    for batch, states in hidden_states(model, candidates, data):
        for name, (x, y) in states.items():
            fits[name].add(x, y, real_tokens(batch, x))
    return {name: fit.unexplained(damp) for name, fit in fits.items() if fit.gram is not None}


class LinearFit(LayerImportance):
    name = "linear_fit"

    def scores(self, model, candidates, data, *, loss_fn=None, metric_fn=None) -> Scores:
        return linear_fit(model, candidates, track(data, "fitting a linear map per block"))
