"""When does a sparse CSR kernel beat a dense Linear on this CPU?

MiniLM-sized layers (384->1536 and 1536->384) on a batch of 8 x 128 tokens. For each sparsity the
dense ``nn.Linear`` and ``pangkas.SparseLinear`` are timed in interleaved rounds
(``torch.utils.benchmark``) and the speedup is dense time / sparse time: the median of per-round
ratios, with a 95% interval. The crossover is the lowest sparsity from which the sparse kernel is
measurably faster (interval above 1) on both shapes; ``pangkas.weights.sparse.DEFAULT_MIN_SPARSITY``
is set from it.

    .venv/bin/python benchmarks/sparse_kernels.py          # writes docs/sparse_kernels.md
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from common import arguments, environment, latency_note, publish
from pangkas import SparseLinear
from pangkas.measure import Ratio, latency_ratios
from pangkas.tables import render_table

SHAPES = ((384, 1536), (1536, 384))  # (in_features, out_features)
SPARSITIES = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98)
REPORTED = (0.5, 0.7, 0.9, 0.95)


def speedup(in_features: int, out_features: int, sparsity: float, rounds: int) -> Ratio:
    """Dense time / sparse time with its interval."""
    dense = nn.Linear(in_features, out_features)
    with torch.no_grad():
        dense.weight.mul_(torch.rand_like(dense.weight) >= sparsity)
    sparse = SparseLinear.from_linear(dense)
    x = torch.randn(8, 128, in_features)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-4, atol=1e-4)
    # The sparse layer as the baseline: each round's ratio is then that round's speedup.
    return latency_ratios([dense, sparse], x, baseline=1, rounds=rounds)[0]


def crossover(results: dict[float, list[Ratio]]) -> float | None:
    """Lowest sparsity from which the sparse kernel is measurably faster (the whole interval above
    1) on every shape at every higher sparsity."""
    winning = None
    for sparsity in sorted(results, reverse=True):
        if not all(r.low > 1.0 for r in results[sparsity]):
            break
        winning = sparsity
    return winning


def main() -> None:
    args = arguments(__doc__, "sparse_kernels.md").parse_args()
    warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
    torch.manual_seed(0)
    results = {s: [speedup(i, o, s, args.rounds) for i, o in SHAPES] for s in SPARSITIES}
    rows = [(f"{s:.0%}" + (" *" if s in REPORTED else ""), *(r.format() for r in results[s]))
            for s in SPARSITIES]
    table = render_table("speedup of SparseLinear (CSR) over dense nn.Linear (95% interval), input 8x128 tokens",
                         ("sparsity", *(f"{i}->{o}" for i, o in SHAPES)), rows, markdown=True)
    cross = crossover(results)
    verdict = (f"Sparse kernels win from **{cross:.0%}** sparsity on both shapes (measurably faster at every "
               "sparsity from there)."
               if cross is not None else
               "Sparse kernels were never measurably faster on both shapes here: keep dense weights on this CPU.")
    publish(args.out, "Sparse kernels: crossover sparsity",
            table, verdict,
            f"Measured with {environment()}. Speedup = dense time / sparse time, {latency_note(args.rounds)}; "
            "shown as a speedup (above 1: the sparse kernel is faster) since the crossover asks when it wins. "
            "Outputs checked equal first. `*`: the headline sparsities (50/70/90/95%).",
            script="sparse_kernels.py")


if __name__ == "__main__":
    main()
