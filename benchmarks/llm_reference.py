"""pangkas's one-shot Wanda and SparseGPT against a plain reference written from the papers.

The reference below is written here from the papers (Sun et al. 2023, "A Simple and Effective
Pruning Approach for Large Language Models"; Frantar & Alistarh 2023, "SparseGPT"), run the way
their repositories run it: the first decoder layer's inputs are captured, then layer by layer the
Linear layers' input statistics are gathered on the inputs the (already pruned) previous layers
produce, every Linear of the layer is pruned, and the layer is run again to give the next one its
inputs. Both sides prune the same model copy, from the same calibration windows, in the same
process; perplexity is measured on the same evaluation windows (llm.py's setup: SmolLM2-135M,
Emma for calibration, Persuasion for evaluation). "masks agree": the share of decoder weights
that both sides zero or both keep.

    .venv/bin/python benchmarks/llm_reference.py                       # writes docs/llm_reference.md
    .venv/bin/python benchmarks/llm_reference.py --calibration 16 --evaluation 8 --out /tmp/r.md
    .venv/bin/python benchmarks/llm_reference.py --tiny                # a random tiny Llama (seconds)
"""

from __future__ import annotations

import copy
import time
import warnings

import torch
from torch import nn

from common import arguments, environment, publish
from corpus import novels
from llm import LAYERS, SKIP, WINDOW, load_model
import pangkas
from pangkas.evaluate import perplexity, token_ids, windows
from pangkas.tables import render_table

BLOCK = 128  # SparseGPT's column block (the paper's B)
DAMP = 0.01  # SparseGPT's dampening: 1% of the mean Hessian diagonal


# -- the reference: Wanda --

def wanda_layer(weight: torch.Tensor, squares: torch.Tensor, sparsity, n_m) -> torch.Tensor:
    """Pruned copy of ``weight``: score |W_ij| * ||X_j||, zero the lowest of each row (or of
    each group of m consecutive inputs in a row)."""
    score = weight.abs() * squares.sqrt()[None, :]
    if n_m is None:
        count = int(weight.shape[1] * sparsity)
        lowest = torch.topk(score, count, dim=1, largest=False).indices
        drop = torch.zeros_like(score, dtype=torch.bool).scatter_(1, lowest, True)
    else:
        drop = m_group_lowest(score, *n_m)
    return weight.masked_fill(drop, 0.0)


def m_group_lowest(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask of the m - n lowest scores in each group of m consecutive columns."""
    groups = score.reshape(score.shape[0], -1, m)
    lowest = torch.topk(groups, m - n, dim=2, largest=False).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, lowest, True).reshape(score.shape)


# -- the reference: SparseGPT --

def sparsegpt_layer(weight: torch.Tensor, hessian: torch.Tensor, sparsity, n_m) -> torch.Tensor:
    """Pruned and updated copy of ``weight`` by SparseGPT: columns left to right in blocks of
    BLOCK; a pruned weight's error e = w / [H^-1]_qq is spread over the columns to its right along
    the Cholesky row of the inverse Hessian (the OBS update, one row of U with H^-1 = U^T U)."""
    w, h = weight.clone(), hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(DAMP * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    columns = w.shape[1]
    for start in range(0, columns, BLOCK):
        end = min(start + BLOCK, columns)
        wb, ub = w[:, start:end].clone(), u[start:end, start:end]
        errors = torch.zeros_like(wb)
        d = ub.diagonal()
        drop = (block_lowest(wb.pow(2) / d.pow(2)[None, :], sparsity) if n_m is None
                else torch.zeros_like(wb, dtype=torch.bool))
        for i in range(end - start):
            if n_m is not None and i % n_m[1] == 0:
                span = slice(i, i + n_m[1])
                drop[:, span] = m_group_lowest(wb[:, span].pow(2) / d[span].pow(2)[None, :], *n_m)
            kept = wb[:, i].masked_fill(drop[:, i], 0.0)
            errors[:, i] = (wb[:, i] - kept) / d[i]
            wb[:, i:] -= torch.outer(errors[:, i], ub[i, i:])
            wb[:, i] = kept
        w[:, start:end] = wb
        w[:, end:] -= errors @ u[start:end, end:]
    return w


def block_lowest(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask of the lowest ``sparsity`` share of a whole column block (one threshold for the block)."""
    drop = torch.zeros(score.numel(), dtype=torch.bool)
    drop[torch.topk(score.flatten(), int(score.numel() * sparsity), largest=False).indices] = True
    return drop.view(score.shape)


# -- the reference: running it layer by layer --

class Statistics:
    """Sum over tokens of x_j^2 (Wanda) or of x x^T (SparseGPT) of one Linear's inputs, float32;
    ``mean=True``: divided by the token count (the same maths, other roundings)."""

    def __init__(self, gram: bool, mean: bool = False):
        self.gram, self.mean, self.total, self.tokens = gram, mean, None, 0

    def __call__(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        part = x.T @ x if self.gram else x.pow(2).sum(0)
        self.total = part if self.total is None else self.total + part
        self.tokens += x.shape[0]

    def result(self) -> torch.Tensor:
        return self.total / self.tokens if self.mean else self.total


class _Captured(Exception):
    pass


def first_layer_calls(model, layer, batches) -> list:
    """(args, kwargs) the first decoder layer is called with, per batch (the rest is skipped)."""
    calls = []

    def catch(module, args, kwargs):
        calls.append((args, kwargs))
        raise _Captured

    handle = layer.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**batch, use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return calls


def run_layer(layer, calls) -> list:
    """The calls of the next layer: this layer's hidden-state output in place of its input."""
    out = []
    for args, kwargs in calls:
        hidden = layer(*args, **kwargs)
        hidden = hidden[0] if isinstance(hidden, (tuple, list)) else hidden
        out.append(((hidden, *args[1:]), kwargs))
    return out


@torch.no_grad()
def reference_prune(model, batches, importance: str, sparsity=None, n_m=None, mean=False) -> None:
    """Prune ``model``'s decoder layers' Linears in place (weights zeroed, SparseGPT's updated);
    ``mean``: statistics averaged over tokens rather than summed."""
    layers = model.get_submodule(LAYERS)
    calls = first_layer_calls(model, layers[0], batches)
    gram = importance == "sparsegpt"
    for layer in layers:
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        stats = {n: Statistics(gram, mean) for n in linears}
        hooks = [m.register_forward_pre_hook(stats[n]) for n, m in linears.items()]
        run_layer(layer, calls)
        for hook in hooks:
            hook.remove()
        for name, linear in linears.items():
            w = linear.weight.float()
            new = (sparsegpt_layer(w, stats[name].result(), sparsity, n_m) if gram
                   else wanda_layer(w, stats[name].result(), sparsity, n_m))
            linear.weight.data = new.to(linear.weight.dtype)
        calls = run_layer(layer, calls)


# -- the comparison --

METHODS = {
    "wanda 50%": ("wanda", {"sparsity": 0.5}),
    "wanda 2:4": ("wanda", {"pattern": "2:4"}),
    "sparsegpt 50%": ("sparsegpt", {"sparsity": 0.5}),
    "sparsegpt 2:4": ("sparsegpt", {"pattern": "2:4"}),
}


def by_reference(model, batches, importance, rule, mean=False):
    n_m = (2, 4) if rule.get("pattern") == "2:4" else None
    reference_prune(model, batches, importance, rule.get("sparsity"), n_m, mean)


def by_reference_mean(model, batches, importance, rule):
    by_reference(model, batches, importance, rule, mean=True)


def by_pangkas(model, batches, importance, rule):
    pangkas.prune_weights(model, importance=importance, include=LAYERS, data=batches, **rule)


def timed(prune, dense, batches, importance, rule):
    """The pruned copy and its (wall, CPU) seconds: CPU time is what a busy machine does not inflate."""
    model = copy.deepcopy(dense)
    wall, cpu = time.perf_counter(), time.process_time()
    prune(model, batches, importance, rule)
    return model, (time.perf_counter() - wall, time.process_time() - cpu)


def zeros(model) -> torch.Tensor:
    """Which decoder Linear weights are zero, all layers concatenated."""
    return torch.cat([m.weight.detach().flatten() == 0 for m in model.get_submodule(LAYERS).modules()
                      if isinstance(m, nn.Linear)])


def compare(name, dense, batches, evaluation) -> tuple:
    importance, rule = METHODS[name]
    ours, ours_s = timed(by_pangkas, dense, batches, importance, rule)
    ref, ref_s = timed(by_reference, dense, batches, importance, rule)
    ppl = [perplexity(m, evaluation, window=WINDOW, batch_size=8) for m in (ours, ref)]
    agree = (zeros(ours) == zeros(ref)).float().mean().item()
    gap = ppl[0] / ppl[1] - 1
    floor = "-"
    if importance == "sparsegpt":  # how far float rounding alone moves the reference
        other, _ = timed(by_reference_mean, dense, batches, importance, rule)
        floor = f"{perplexity(other, evaluation, window=WINDOW, batch_size=8) / ppl[1] - 1:+.2%}"
    return (name, f"{ppl[0]:.3f}", f"{ppl[1]:.3f}", f"{gap:+.2%}", floor, f"{ours_s[0]:.1f}", f"{ref_s[0]:.1f}",
            f"{ours_s[0] / ref_s[0]:.2f}", f"{ours_s[1]:.1f}", f"{ref_s[1]:.1f}", f"{ours_s[1] / ref_s[1]:.2f}",
            f"{agree:.2%}")


def tiny_model():
    """A random 4-layer Llama with SmolLM2's layout, small (a quick check of the reference)."""
    import transformers
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def data(args):
    if args.tiny:
        ids = torch.randint(0, 512, (args.calibration + args.evaluation, WINDOW))
        return tiny_model(), [{"input_ids": w[None]} for w in ids[:args.calibration]], ids[args.calibration:].flatten()
    dense, tokenizer = load_model()
    books = novels()
    calib = [{"input_ids": w[None]} for w in
             windows(token_ids(books["emma"], tokenizer), WINDOW, args.calibration, start=SKIP)]
    evaluation = windows(token_ids(books["persuasion"], tokenizer), WINDOW, args.evaluation, start=SKIP).flatten()
    return dense, calib, evaluation


COLUMNS = ("method", "pangkas ppl", "reference ppl", "ppl gap", "reference, mean stats", "pangkas s", "reference s",
           "time ratio", "pangkas CPU s", "reference CPU s", "CPU ratio", "masks agree")


def main():
    parser = arguments(__doc__, "llm_reference.md", rounds=None)
    parser.add_argument("--calibration", type=int, default=32, help="calibration windows of 256 tokens")
    parser.add_argument("--evaluation", type=int, default=24, help="evaluation windows of 256 tokens")
    parser.add_argument("--methods", nargs="*", choices=list(METHODS), help="some methods only (printed)")
    parser.add_argument("--tiny", action="store_true", help="a random tiny Llama instead of SmolLM2 (printed)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    dense, calib, evaluation = data(args)
    dense_ppl = perplexity(dense, evaluation, window=WINDOW, batch_size=8)  # also warms up
    print(f"dense perplexity {dense_ppl:.3f}", flush=True)
    rows = []
    for name in args.methods or METHODS:
        rows.append(compare(name, dense, calib, evaluation))
        print(" | ".join(rows[-1]), flush=True)
    model = "tiny random Llama" if args.tiny else "SmolLM2-135M-Instruct"
    table = render_table(f"{model}: pangkas vs a reference from the papers, dense perplexity {dense_ppl:.3f} "
                         f"on {args.evaluation} x {WINDOW} tokens, calibration {args.calibration} x {WINDOW}",
                         COLUMNS, rows, markdown=True)
    if args.methods or args.tiny:
        print(table)
        return
    notes = (f"Measured with {environment()}. ppl gap: pangkas's perplexity relative to the reference's "
             "(the target: within 1%); reference, mean stats: the reference run again with its statistics "
             "divided by the token count (the same maths; pangkas divides too), its perplexity relative to "
             "the first run: how far float rounding alone moves SparseGPT once it compounds over 30 "
             "sequential layers; time ratio: pangkas's prune time over the reference's (target: <= 1); CPU: the same "
             "in process CPU time (one thread), which other work on the machine does not inflate. "
             "Both prune every Linear of the decoder layers; the reference is this script's own code "
             "from the papers (float32 statistics, SparseGPT's 128-column blocks with one threshold per "
             "block and 1% dampening, Wanda's per-row rule), run layer by layer on the pruned "
             "previous layers' outputs as the papers' repositories do.")
    publish(args.out, "One-shot pruning: pangkas against a reference implementation", table, notes,
            script="llm_reference.py")


if __name__ == "__main__":
    main()
