"""``importance="bn_scale"``: network slimming, |BatchNorm gamma| (Liu et al. 2017)."""

from __future__ import annotations

from torch import nn

from .base import FromFunction, Importance, Scores, Slice
from .l1 import l1

FALLBACK_WEIGHT = 1e-6  # l1 only breaks ties and ranks groups that have no BatchNorm


def _is_gamma(piece: Slice) -> bool:
    return isinstance(piece.module, nn.modules.batchnorm._BatchNorm) and piece.attribute == "weight"


class BNScale(Importance):
    name = "bn_scale"

    def score(self, piece: Slice, measured):
        return piece.tensor.float().abs() if _is_gamma(piece) else None

    def scores(self, slices, measured) -> Scores:
        slices = list(slices)
        result = super().scores(slices, measured)
        others = [p for p in slices if not _is_gamma(p)]
        fallback = FromFunction(l1).scores(others, None)
        result.update({key: s * FALLBACK_WEIGHT for key, s in fallback.items()})
        return result
