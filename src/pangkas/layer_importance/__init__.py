"""Which blocks layer pruning removes (``plan_layers(importance=)``): a score per block, lower
goes first.

Adding one is one small file plus a registration::

    class Depth(pangkas.layer_importance.LayerImportance):
        name = "depth"            # the deepest blocks go first
        needs_data = False

        def scores(self, model, candidates, data, **fns):
            return {c.name: -i for i, c in enumerate(candidates)}

    pangkas.layer_importance.register(Depth())               # then importance="depth"
    pangkas.plan_layers(model, data, n=2, importance=Depth())  # or pass the object

A criterion that calls the user's ``loss_fn`` / ``metric_fn`` sets ``needs_loss`` /
``needs_metric``; one whose choice is not "the n lowest" overrides ``choose`` (see
``angular.py``, ``skipping.py``). A plain ``fn(model, candidates, data) -> scores`` works too.
Built-ins are registered below.
"""

from .angular import Angular, angular, runs
from .base import Candidate, FromFunction, LayerImportance, Scores, checked, lowest, nested
from .block_influence import BlockInfluence, block_influence
from .linear_fit import LinearFit, linear_fit
from .magnitude import Magnitude, magnitude
from .registry import names, register, resolve, unregister
from .skipping import Loss, Metric, greedy, skipping
from .states import cosine, hidden_states, input_tensor, real_tokens

for _builtin in (BlockInfluence(), Angular(), Loss(), Metric(), Magnitude(), LinearFit()):
    register(_builtin)

__all__ = [
    "Angular", "BlockInfluence", "Candidate", "FromFunction", "LayerImportance", "LinearFit", "Loss", "Magnitude",
    "Metric", "Scores", "angular", "block_influence", "checked", "cosine", "greedy", "hidden_states", "input_tensor",
    "linear_fit", "lowest", "magnitude", "names", "nested", "real_tokens", "register", "resolve", "runs",
    "skipping", "unregister",
]
