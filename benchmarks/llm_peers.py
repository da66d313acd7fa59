"""pangkas's one-shot Wanda and SparseGPT against llmcompressor's, on the real LLM.

llmcompressor (the vLLM project's compression library) runs its ``oneshot`` Wanda and SparseGPT on
CPU too. Both sides prune every Linear of SmolLM2-135M's decoder layers from the same calibration
windows (llm.py's: 32 x 256 tokens of *Emma*), one decoder layer at a time on the previous pruned
layers' outputs, with the same thread count; the pruned weights are evaluated here by the same
``pangkas.evaluate.perplexity`` on the same windows (24 x 256 tokens of *Persuasion*). pangkas runs
in this process; llmcompressor in a subprocess (``llmcompressor_run.py``) under its own
environment, because its pins lag torch and transformers: it must not become a pangkas dependency.

The llmcompressor environment (checked with llmcompressor 0.14.0.1 and compressed-tensors 0.19.0,
which pin torch<=2.14.0 and transformers<=5.17; they ran unchanged on torch 2.14.1 and
transformers 5.24): a venv that reuses this project's torch, transformers and model package through
a ``.pth`` file, and gets llmcompressor and its few pure-Python dependencies without theirs::

    .venv/bin/python -m venv .venv-llmcompressor
    echo "$PWD/.venv/lib/python3.11/site-packages" > .venv-llmcompressor/lib/python3.11/site-packages/main.pth
    .venv-llmcompressor/bin/pip install --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.19.0 \\
        loguru datasets multiprocess pandas pyarrow dill xxhash requests urllib3 certifi charset-normalizer

llmcompressor is given the dense model (saved here with ``save_pretrained``: it cannot save a
model loaded from GGUF, so a fresh one from the same config gets the weights), its tokenizer as
``processor``, the calibration windows as a ``datasets.Dataset`` of ``input_ids`` (unshuffled,
batch size 1), ``pipeline="sequential"`` with ``sequential_targets=["LlamaDecoderLayer"]``, and
``WandaPruningModifier`` / ``SparseGPTModifier(block_size=128, dampening_frac=0.01)`` with
``sparsity=0.5`` (``mask_structure="2:4"`` for 2:4) and ``targets=["LlamaDecoderLayer"]`` (the
Linears inside the decoder layers, as pangkas's ``include="model.layers"``). Both default to
128-column blocks and 1% dampening. llmcompressor's magnitude pruning is a training-time
modifier (a sparsity schedule over steps), so it has no row here.

    .venv/bin/python benchmarks/llm_peers.py                  # writes docs/llm_peers.md
    .venv/bin/python benchmarks/llm_peers.py --methods "sparsegpt 50%" --calibration 8 --evaluation 8
    .venv/bin/python benchmarks/llm_peers.py --llmcompressor /path/to/other/venv/bin/python
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from common import arguments, environment, publish
from corpus import novels
from llm import LAYERS, SKIP, WINDOW, load_model
import pangkas
from pangkas.evaluate import perplexity, token_ids, windows
from pangkas.tables import render_table

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "llmcompressor_run.py"
DEFAULT_PYTHON = os.environ.get("LLMCOMPRESSOR_PYTHON", str(ROOT / ".venv-llmcompressor" / "bin" / "python"))
METHODS = {
    "wanda 50%": ("wanda", {"sparsity": 0.5}),
    "sparsegpt 50%": ("sparsegpt", {"sparsity": 0.5}),
    "wanda 2:4": ("wanda", {"pattern": "2:4"}),
    "sparsegpt 2:4": ("sparsegpt", {"pattern": "2:4"}),
}


def by_pangkas(dense, calib, method):
    """The pruned copy and its prune seconds (wall, CPU)."""
    importance, rule = METHODS[method]
    model = copy.deepcopy(dense)
    wall, cpu = time.perf_counter(), time.process_time()
    pangkas.prune_weights(model, importance=importance, include=LAYERS, data=calib, **rule)
    return model, (time.perf_counter() - wall, time.process_time() - cpu)


def by_llmcompressor(dense, folder: Path, python: str, method: str, threads: int):
    """The copy llmcompressor pruned (in a subprocess) and its ``oneshot`` seconds (wall, CPU)."""
    out = folder / "pruned.pt"
    command = [python, str(WORKER), "--model", str(folder / "dense"), "--calibration", str(folder / "calib.pt"),
               "--method", method, "--threads", str(threads), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"llmcompressor failed on {method}:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    model = copy.deepcopy(dense)
    model.load_state_dict(torch.load(out), strict=False)
    return model, (result["seconds"], result["cpu_seconds"])


def save_inputs(dense, tokenizer, calib_ids: torch.Tensor, folder: Path) -> None:
    """The dense model (a fresh instance from the same config: a GGUF-loaded model does not save)
    and the calibration windows, for the llmcompressor subprocess."""
    import transformers
    config = dense.config.to_dict()
    config.pop("quantization_config", None)
    fresh = transformers.AutoModelForCausalLM.from_config(type(dense.config).from_dict(config))
    fresh.load_state_dict(dense.state_dict())
    fresh.save_pretrained(folder / "dense")
    tokenizer.save_pretrained(folder / "dense")
    torch.save(calib_ids, folder / "calib.pt")


def zeros(model) -> torch.Tensor:
    return torch.cat([m.weight.detach().flatten() == 0 for m in model.get_submodule(LAYERS).modules()
                      if isinstance(m, nn.Linear)])


def compare(method, dense, calib, evaluation, folder, python, threads) -> tuple:
    ours, ours_s = by_pangkas(dense, calib, method)
    theirs, theirs_s = by_llmcompressor(dense, folder, python, method, threads)
    ppl = [perplexity(m, evaluation, window=WINDOW, batch_size=8) for m in (ours, theirs)]
    agree = (zeros(ours) == zeros(theirs)).float().mean().item()
    return (method, f"{ppl[0]:.3f}", f"{ppl[1]:.3f}", f"{ppl[0] / ppl[1] - 1:+.2%}", f"{ours_s[0]:.1f}",
            f"{theirs_s[0]:.1f}", f"{ours_s[0] / theirs_s[0]:.2f}", f"{ours_s[1]:.1f}", f"{theirs_s[1]:.1f}",
            f"{agree:.2%}")


COLUMNS = ("method", "pangkas ppl", "llmcompressor ppl", "ppl gap", "pangkas s", "llmcompressor s", "time ratio",
           "pangkas CPU s", "llmcompressor CPU s", "masks agree")


def main():
    parser = arguments(__doc__, "llm_peers.md", rounds=None)
    parser.add_argument("--calibration", type=int, default=32, help="calibration windows of 256 tokens")
    parser.add_argument("--evaluation", type=int, default=24, help="evaluation windows of 256 tokens")
    parser.add_argument("--methods", nargs="*", choices=list(METHODS), help="some methods only (printed)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    parser.add_argument("--llmcompressor", default=DEFAULT_PYTHON, help="Python of the llmcompressor environment")
    args = parser.parse_args()
    if not Path(args.llmcompressor).is_file():
        raise SystemExit(f"llmcompressor not installed: no {args.llmcompressor}. How to install it (a separate "
                         f"environment, never pangkas's own):\n\n{__doc__}")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, both sides", flush=True)
    torch.manual_seed(0)
    dense, tokenizer = load_model()
    books = novels()
    calib_ids = windows(token_ids(books["emma"], tokenizer), WINDOW, args.calibration, start=SKIP)
    calib = [{"input_ids": w[None]} for w in calib_ids]
    evaluation = windows(token_ids(books["persuasion"], tokenizer), WINDOW, args.evaluation, start=SKIP).flatten()
    dense_ppl = perplexity(dense, evaluation, window=WINDOW, batch_size=8)  # also warms up
    print(f"dense perplexity {dense_ppl:.3f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        save_inputs(dense, tokenizer, calib_ids, Path(tmp))
        for method in args.methods or METHODS:
            rows.append(compare(method, dense, calib, evaluation, Path(tmp), args.llmcompressor, args.threads))
            print(" | ".join(rows[-1]), flush=True)
    table = render_table(f"SmolLM2-135M-Instruct: pangkas vs llmcompressor, dense perplexity {dense_ppl:.3f} on "
                         f"{args.evaluation} x {WINDOW} tokens, calibration {args.calibration} x {WINDOW}",
                         COLUMNS, rows, markdown=True)
    if args.methods:
        print(table)
        return
    notes = (f"Measured with {environment()}, llmcompressor {llmcompressor_version(args.llmcompressor)} in its own "
             "environment on the same torch, both sides with the same thread count. ppl gap: pangkas's perplexity "
             "relative to llmcompressor's; time ratio: pangkas's prune time over llmcompressor's (target: <= 1). "
             "pangkas s: the `prune_weights` call; llmcompressor s: its `oneshot` call in the subprocess, which "
             "also turns the windows into a data loader and traces the model into per-layer subgraphs (model "
             "loading and interpreter start are outside both figures). CPU: process CPU time of the same spans. "
             "Both prune every Linear of the decoder layers with 128-column blocks and 1% dampening "
             "(SparseGPT), one decoder layer at a time on the pruned previous layers' outputs, each layer run "
             "twice per batch (statistics, then the next layer's inputs). masks agree: the share of decoder "
             "weights both zero or both keep. The recipe on llmcompressor's side is in the script's docstring.")
    publish(args.out, "One-shot pruning: pangkas against llmcompressor", table, notes, script="llm_peers.py")


def llmcompressor_version(python: str) -> str:
    code = "from importlib.metadata import version; print(version('llmcompressor'))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip() or "?"


if __name__ == "__main__":
    main()
