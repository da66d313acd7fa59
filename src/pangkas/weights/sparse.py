"""Sparse execution: Linear layers whose weights are mostly zero, run with a CSR kernel.

Whether this pays depends on the CPU, the shapes and the sparsity; ``benchmarks/sparse_kernels.py``
measures the crossover and ``DEFAULT_MIN_SPARSITY`` follows from its committed result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import PangkasError
from ..modules import Selector, replace_module, select_modules
from ..tables import render_table

# docs/sparse_kernels.md: on the dev CPU at its default 2 threads, CSR was measurably faster than
# dense on both MiniLM shapes from 90% (at 1 thread already from 85%: fewer threads favour CSR; an
# earlier run on another CPU, without intervals: from 98%). Change it where that benchmark says
# your CPU crosses over elsewhere.
DEFAULT_MIN_SPARSITY = 0.90


class SparseLinear(nn.Module):
    """Inference-only ``nn.Linear`` whose weight is held as a ``torch.sparse_csr`` tensor."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().to_sparse_csr())
        self.has_bias = bias is not None
        column = torch.zeros(self.out_features) if bias is None else bias.detach()
        self.register_buffer("bias_column", column.reshape(-1, 1).to(weight.dtype).clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "SparseLinear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        # bias + W @ x^T with x^T left as a column-major view: measured about twice as fast on
        # CPU (MKL) as sparse.mm on a contiguous copy; the transposed result is again a view.
        out = torch.addmm(self.bias_column, self.weight, flat.t()).t()
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        density = self.weight.values().numel() / (self.in_features * self.out_features)
        return f"in_features={self.in_features}, out_features={self.out_features}, density={density:.3f}"


@dataclass(frozen=True)
class SparseReport:
    """Which Linear layers now run sparse, and why the others were left dense."""

    swapped: dict[str, float]
    kept: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        rows = [(name, f"{s:.2%}", "sparse CSR") for name, s in self.swapped.items()]
        rows += [(name, "", f"dense: {why}") for name, why in self.kept.items()]
        return render_table("to_sparse_inference", ("layer", "sparsity", "runs as"), rows)


@torch.no_grad()
def to_sparse_inference(
    model: nn.Module,
    min_sparsity: float = DEFAULT_MIN_SPARSITY,
    *,
    include: Selector = None,
    exclude: Selector = None,
) -> SparseReport:
    """Replace each selected ``nn.Linear`` with at least ``min_sparsity`` zeros by a ``SparseLinear``.

    For inference only (no gradients through the sparse weight). Masks on swapped layers are
    folded into the sparse weight. Layers below the bar, or not float32/float64 on CPU, stay dense.
    """
    if not (isinstance(min_sparsity, (int, float)) and 0 <= min_sparsity <= 1):
        raise PangkasError(f"min_sparsity must be a number in [0, 1], got {min_sparsity!r}")
    chosen = select_modules(model, (nn.Linear,), include, exclude)
    if not chosen:
        raise PangkasError(f"{type(model).__name__} has no selected nn.Linear layer to make sparse")
    if chosen[0][0] == "":
        raise PangkasError("the model itself is a Linear: wrap it in a module, or use SparseLinear.from_linear")
    swaps, kept = {}, {}
    for name, linear in chosen:
        weight = linear.weight
        sparsity = 1 - int(torch.count_nonzero(weight)) / weight.numel()
        if weight.dtype not in (torch.float32, torch.float64) or weight.device.type != "cpu":
            kept[name] = f"{weight.dtype} on {weight.device.type}: no CPU CSR kernel"
        elif sparsity < min_sparsity:
            kept[name] = f"sparsity {sparsity:.2%} < min_sparsity {min_sparsity:.0%}"
        else:
            swaps[name] = (SparseLinear.from_linear(linear), sparsity)
    for name, (sparse, _) in swaps.items():
        replace_module(model, name, sparse)
    return SparseReport({name: s for name, (_, s) in swaps.items()}, kept)
