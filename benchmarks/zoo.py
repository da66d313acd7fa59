"""Prunability of every torchvision classifier: channel pruning at ratio 0.5 (local, L1).

For each model in ``torchvision.models.list_models(module=torchvision.models)`` (random weights,
randomised so the oracle is sensitive): plan + apply time (tracing included), params and MACs
before and after, and the oracle error (outputs of the pruned model vs the unpruned model whose
removed channels were silenced; exact pruning gives float rounding only). Also how planning time
grows with depth (ResNet-18/50/101/152).

    .venv/bin/python benchmarks/zoo.py            # writes docs/zoo.md (about 10 minutes)
"""

from __future__ import annotations

import copy
import gc
import time
import warnings

import torch
import torchvision

from common import arguments, environment, publish
from pangkas import plan_channels
from pangkas.oracle import oracle_error, randomize
from pangkas.tables import human_count, render_table

RATIO = 0.5
TOLERANCE = 1e-5


def size_for(name: str) -> int:
    return 299 if "inception" in name else 224


def run(name: str) -> dict:
    model = randomize(torchvision.models.get_model(name, weights=None).eval())
    x = torch.randn(1, 3, size_for(name), size_for(name))
    work = copy.deepcopy(model)
    start = time.perf_counter()
    plan = plan_channels(work, x, ratio=RATIO)
    plan.apply()
    seconds = time.perf_counter() - start
    del work
    error, _ = oracle_error(model, x, lambda m: plan_channels(m, x, ratio=RATIO))
    return {"params": (plan.params_before, plan.params_after), "macs": (plan.macs_before, plan.macs_after),
            "seconds": seconds, "error": error, "retries": len(plan.retried)}


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
            ok = r["error"] <= TOLERANCE and r["macs"][1] < r["macs"][0]
            status = "pass" if ok else f"FAIL: oracle error {r['error']:.1e}"
            passed += ok
            total_time += r["seconds"]
            results[name] = r
            rows.append((name, status, f"{human_count(r['params'][0])} -> {human_count(r['params'][1])}",
                         f"{human_count(r['macs'][0])} -> {human_count(r['macs'][1])}",
                         f"{r['macs'][1] / r['macs'][0]:.2f}", f"{r['seconds']:.2f}", f"{r['error']:.1e}",
                         r["retries"]))
        except Exception as exc:  # a failure is a result here: record it and go on
            rows.append((name, f"FAIL: {type(exc).__name__}: {str(exc)[:120]}", "", "", "", "", "", ""))
        print(rows[-1], flush=True)
        gc.collect()
    table = render_table(
        f"channel pruning, ratio {RATIO} local L1, every torchvision classifier",
        ("model", "result", "params", "MACs", "MACs after/before", "plan+apply s", "oracle error",
         "surgery retries"), rows, markdown=True)
    depth = [(n, f"{results[n]['seconds']:.2f}") for n in ("resnet18", "resnet50", "resnet101", "resnet152")
             if n in results]
    depth_table = render_table("plan + apply time vs depth", ("model", "seconds"), depth, markdown=True)
    slowest = max(results.items(), key=lambda kv: kv[1]["seconds"]) if results else ("-", {"seconds": 0})
    publish(args.out, "Prunability of the torchvision zoo",
            f"**{passed}/{len(names)} models pruned with the oracle holding** (error <= {TOLERANCE:g}); "
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
