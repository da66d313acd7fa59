"""Prunability of every torchvision classifier: channel pruning at ratio 0.5 (local, L1).

For each model in ``torchvision.models.list_models(module=torchvision.models)`` (random weights,
randomised so the oracle is sensitive): plan + apply time (tracing included), params and MACs
before and after, and the oracle error (outputs of the pruned model vs the unpruned model whose
removed channels were silenced; exact pruning gives float rounding only). Also how planning time
grows with depth (ResNet-18/50/101/152).

    .venv/bin/python benchmarks/zoo.py            # writes docs/zoo.md (about 10 minutes)
"""

from __future__ import annotations

import gc
import warnings

import torch
import torchvision

from common import (ZOO_COLUMNS, ZOO_RATIO, ZOO_TOLERANCE, arguments, environment, exact, failure_row,
                    prune_and_check, publish, result_row)
from pangkas.oracle import randomize
from pangkas.tables import render_table


def size_for(name: str) -> int:
    return 299 if "inception" in name else 224


def run(name: str) -> dict:
    model = randomize(torchvision.models.get_model(name, weights=None).eval())
    x = torch.randn(1, 3, size_for(name), size_for(name))
    return prune_and_check(model, x)


def main() -> None:
    parser = arguments(__doc__, "zoo.md", rounds=None)
    parser.add_argument("models", nargs="*", help="subset of models (default: all)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    rows, passed, total_time, results = [], 0, 0.0, {}
    for name in names:
        torch.manual_seed(0)
        try:
            r = run(name)
            ok = exact(r) and r["macs"][1] < r["macs"][0]
            passed += ok
            total_time += r["seconds"]
            results[name] = r
            rows.append(result_row(name, r))
        except Exception as exc:  # a failure is a result here: record it and go on
            rows.append(failure_row(name, exc))
        print(rows[-1], flush=True)
        gc.collect()
    table = render_table(
        f"channel pruning, ratio {ZOO_RATIO} local L1, every torchvision classifier", ZOO_COLUMNS, rows,
        markdown=True)
    depth = [(n, f"{results[n]['seconds']:.2f}") for n in ("resnet18", "resnet50", "resnet101", "resnet152")
             if n in results]
    depth_table = render_table("plan + apply time vs depth", ("model", "seconds"), depth, markdown=True)
    slowest = max(results.items(), key=lambda kv: kv[1]["seconds"]) if results else ("-", {"seconds": 0})
    publish(args.out, "Prunability of the torchvision zoo",
            f"**{passed}/{len(names)} models pruned with the oracle holding** (error <= {ZOO_TOLERANCE:g}); "
            f"plan + apply for all of them took {total_time:.0f} s in total, the slowest "
            f"{slowest[0]} {slowest[1]['seconds']:.1f} s.",
            table, depth_table,
            f"Measured with {environment()}. Inputs 1x3x224x224 (299 for Inception). Random weights "
            "(randomised: no zero-initialised heads) so the oracle can fail. The oracle zeroes the "
            "input weights of every consumer of the removed channels, records the output, applies the "
            "plan, and compares. Channels under LayerNorm over channels or attention scales are kept "
            "(exact mode) and attention heads go whole, so ViT and Swin lose heads and MLP channels, "
            "MaxViT its MLP channels.",
            script="zoo.py")


if __name__ == "__main__":
    main()
