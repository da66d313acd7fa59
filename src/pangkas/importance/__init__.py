"""How much each channel matters, for channel, head and FFN pruning (``importance=``).

A criterion scores the positions of every traced tensor dim (:class:`Slice`); a channel's
importance sums the scores of every tensor it touches (a conv's filter, the BatchNorm entry
after it, the next conv's input slice), each made scale-free first (divided by its mean).

Adding one is one small file plus a registration::

    class MaxAbs(pangkas.importance.Importance):
        name = "max_abs"

        def score(self, piece, measured):
            return piece.tensor.abs().amax(piece.others) if piece.others else piece.tensor.abs()

    pangkas.importance.register(MaxAbs())        # then importance="max_abs" anywhere
    pangkas.plan_channels(model, x, ratio=0.5, importance=MaxAbs())   # or pass the object

A criterion that reads the model's behaviour sets ``needs_data`` / ``needs_loss`` and computes
it in :meth:`Importance.measure` (see ``taylor.py``, ``wanda.py``). A plain
``fn(tensor, dim) -> scores`` works too. Built-ins are registered below.
"""

from .base import FromFunction, Importance, Scores, Slice
from .bn_scale import BNScale
from .fpgm import FPGM, fpgm
from .l1 import L1, l1
from .l2 import L2, l2
from .obs import OBS, input_grams, inverse_hessian, removal_errors
from .random import Random
from .registry import names, register, resolve, unregister
from .taylor import Taylor, gradients
from .wanda import Wanda, input_norms

for _builtin in (L1(), L2(), FPGM(), BNScale(), Taylor(), Wanda(), OBS(), Random()):
    register(_builtin)

__all__ = [
    "BNScale", "FPGM", "FromFunction", "Importance", "L1", "L2", "OBS", "Random", "Scores", "Slice", "Taylor",
    "Wanda", "fpgm", "gradients", "input_norms", "input_grams", "inverse_hessian", "l1", "l2", "names", "register",
    "removal_errors", "resolve", "unregister",
]
