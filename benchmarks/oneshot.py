"""One-shot weight pruning without retraining: magnitude vs Wanda vs SparseGPT.

(a) The pretrained MiniLM encoder (all-MiniLM-L6-v2), its encoder Linear layers pruned to 50%
    unstructured and to 2:4: mean cosine of mean-pooled sentence embeddings to the full model's
    on 600 CPython documentation sentences, calibration on 100 others (``minilm.py``).
    Magnitude is per layer (each matrix loses 50%); Wanda and SparseGPT per output row, block by
    block.
(b) The demo's digits CNN (trained as in ``pangkas demo``), every conv and Linear pruned to 50%
    and 2:4 (input channels in groups of 4): test accuracy, calibration on 256 training images.

    .venv/bin/python benchmarks/oneshot.py            # writes docs/oneshot.md
"""

from __future__ import annotations

import copy
import warnings

import torch

import minilm
from common import arguments, environment, publish
from pangkas import prune_weights
from pangkas.demo import accuracy, digits_cnn, load_digits_split, train
from pangkas.tables import render_table

RULES = (("50%", {"sparsity": 0.5}), ("2:4", {"pattern": "2:4"}))
IMPORTANCE = ("magnitude", "wanda", "sparsegpt")


def minilm_rows() -> list[tuple]:
    model, calibration, evaluation, reference, _ = minilm.setup()
    rows = []
    for label, rule in RULES:
        for importance in IMPORTANCE:
            pruned = copy.deepcopy(model)
            options = {} if importance == "magnitude" else {"data": calibration}
            prune_weights(pruned, importance=importance, include="encoder", **rule, **options)
            cosine = minilm.fidelity(pruned, evaluation, reference)
            rows.append(("MiniLM", label, importance, f"mean cosine {cosine:.3f}"))
            print(rows[-1], flush=True)
    return rows


def digits_rows() -> list[tuple]:
    torch.manual_seed(0)
    data = load_digits_split(0)
    model = digits_cnn()
    train(model, data, 40, desc="training")
    rows = [("digits CNN", "dense", "-", f"accuracy {accuracy(model, data.x_test, data.y_test):.2%}")]
    calibration = list(data.x_train[:256].split(64))
    for label, rule in RULES:
        for importance in IMPORTANCE:
            pruned = copy.deepcopy(model)
            options = {} if importance == "magnitude" else {"data": calibration}
            prune_weights(pruned, importance=importance, **rule, **options)
            rows.append(("digits CNN", label, importance, f"accuracy {accuracy(pruned, data.x_test, data.y_test):.2%}"))
            print(rows[-1], flush=True)
        pruned = copy.deepcopy(model)  # the usual recipe keeps the first layer dense
        prune_weights(pruned, importance="wanda", exclude="0.0", data=calibration, **rule)
        rows.append(("digits CNN", label, "wanda, first conv dense",
                     f"accuracy {accuracy(pruned, data.x_test, data.y_test):.2%}"))
    return rows


def main() -> None:
    args = arguments(__doc__, "oneshot.md", rounds=None).parse_args()
    warnings.filterwarnings("ignore")
    rows = minilm_rows() + digits_rows()
    table = render_table("one-shot weight pruning, no fine-tuning", ("model", "sparsity", "importance", "result"),
                         rows, markdown=True)
    publish(args.out, "One-shot weight pruning: magnitude, Wanda, SparseGPT", table,
            f"Measured with {environment()}. MiniLM: encoder Linear layers only (embeddings and "
            "pooler untouched); 2:4 groups run along each layer's inputs. digits CNN: all layers, "
            "including the first convolution (one input channel, 9 weights per filter), where "
            "per-filter Wanda removes 4 of 9 taps of every filter; the rows 'first conv dense' keep "
            "that layer, as one-shot recipes usually do.",
            script="oneshot.py")


if __name__ == "__main__":
    main()
