"""One llmcompressor ``oneshot`` run for ``llm_peers.py``, in llmcompressor's own environment.

Runs under the other virtual environment's Python (see ``llm_peers.py`` for how it is built), so
it imports nothing of pangkas: it reads the dense model that ``llm_peers.py`` saved with
``save_pretrained`` and the calibration token windows it saved with ``torch.save``, prunes every
Linear inside the decoder layers with llmcompressor's Wanda or SparseGPT modifier through the
sequential pipeline (one decoder layer at a time), writes the pruned decoder weights back for the
caller to evaluate, and prints one JSON line: ``{"seconds": ..., "cpu_seconds": ..., "threads": ...}``: the
wall and process CPU time of the ``oneshot`` call alone.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch


def recipe(method: str):
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    importance, rule = method.split()
    structure = {"mask_structure": "2:4"} if rule == "2:4" else {}
    common = {"sparsity": 0.5, "targets": ["LlamaDecoderLayer"], **structure}
    if importance == "wanda":
        return WandaPruningModifier(**common)
    # pangkas's defaults, spelled out (they are llmcompressor's defaults too)
    return SparseGPTModifier(block_size=128, dampening_frac=0.01, **common)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="folder written by save_pretrained (model and tokenizer)")
    parser.add_argument("--calibration", required=True, help="torch.save'd int64 tensor (windows, tokens)")
    parser.add_argument("--method", required=True, choices=["wanda 50%", "wanda 2:4", "sparsegpt 50%", "sparsegpt 2:4"])
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--out", required=True, help="where the pruned decoder weights are torch.save'd")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import datasets
    import transformers
    from llmcompressor import oneshot

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    ids = torch.load(args.calibration)
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    start, cpu = time.perf_counter(), time.process_time()
    oneshot(model=model, processor=tokenizer, recipe=recipe(args.method), dataset=data,
            num_calibration_samples=len(ids), max_seq_length=ids.shape[1], shuffle_calibration_samples=False,
            batch_size=1, pipeline="sequential", sequential_targets=["LlamaDecoderLayer"])
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    layers = {k: v for k, v in model.state_dict().items() if k.startswith("model.layers.")}
    torch.save(layers, args.out)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
