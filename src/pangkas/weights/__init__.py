"""Unstructured and N:M weight pruning: criteria, mask rules, lasting masks, sparse kernels."""

from . import criteria
from .criteria import CalibratedImportance, Magnitude, Random, WeightImportance
from .masks import finalize
from .prune import LayerSparsity, WeightPlan, WeightReport, plan_weights, prune_weights
from .sparse import SparseLinear, SparseReport, to_sparse_inference
from .sparsegpt import SparseGPT
from .wanda import Wanda

for _builtin in (Magnitude(), Random(), Wanda(), SparseGPT()):
    criteria.register(_builtin)

__all__ = [
    "CalibratedImportance", "LayerSparsity", "SparseLinear", "SparseReport", "WeightImportance", "WeightPlan",
    "WeightReport", "criteria", "finalize", "plan_weights", "prune_weights", "to_sparse_inference",
]
