"""Unstructured and N:M weight pruning: criteria, mask rules, lasting masks, sparse kernels."""

from .masks import finalize
from .prune import LayerSparsity, WeightReport, prune_weights
from .sparse import SparseLinear, SparseReport, to_sparse_inference

__all__ = [
    "LayerSparsity", "SparseLinear", "SparseReport", "WeightReport",
    "finalize", "prune_weights", "to_sparse_inference",
]
