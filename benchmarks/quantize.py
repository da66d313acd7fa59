"""Quantization stacked on pruning: fidelity, latency on each deployment path, file sizes.

Sections (each writes its own page under docs/quantize/):

- ``minilm``: pretrained all-MiniLM-L6-v2: ``int8-dynamic`` and ``int8-weight-only`` alone and on
  top of heads + FFN pruning (50% each, obs + reconstruct); mean cosine of sentence embeddings to
  the full model on 600 sentences, latency at batch 8 x 128 tokens in eager mode, under
  ``torch.compile`` (compile time excluded, reported) and in onnxruntime (the float models, and
  ``int8-dynamic`` by onnxruntime's quantizer); file as ``pangkas.save`` or the ONNX export writes it.
- ``resnet50``: ResNet-50 (random weights: no pretrained weights install offline), channels
  pruned at 0.5, ``int8-static`` (torchao's, and onnxruntime's quantizer's): every model on eager,
  ``torch.compile`` and onnxruntime at batch 1 and 8, against the dense fp32 model in eager mode in
  the same interleaved rounds; files; onnxruntime's profile of where the time goes.
- ``llm``: SmolLM2-135M (``llm.py``): 2:4 SparseGPT, int8 weight-only, both; perplexity; each
  written as a compressed-tensors directory and reloaded through transformers + compressed-tensors.

Every model is compared with its dense original in the same process; threads: 1.

    .venv/bin/python benchmarks/quantize.py --sections minilm
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # `compile s`: a first compile, not a cache hit
import torch  # noqa: E402

from common import environment, latency_note, run_sections  # noqa: E402
import pangkas  # noqa: E402
from pangkas.export import OnnxRuntimeModule, onnx_bytes  # noqa: E402
from pangkas.inputs import call_model  # noqa: E402
from pangkas.measure import latency_ratios  # noqa: E402
from pangkas.tables import render_table  # noqa: E402



def _compiled(model, example) -> tuple[torch.nn.Module, float]:
    """``torch.compile(model)`` warmed up on ``example``, and the seconds the first calls took."""
    compiled = torch.compile(model)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(2):
            call_model(compiled, example)
    return compiled, time.perf_counter() - start


def _file_kib(model) -> float:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        pangkas.save(model, path)
        return path.stat().st_size / 1024


class _Hidden(torch.nn.Module):
    """An onnxruntime file behind a Hugging Face encoder's output (``.last_hidden_state``)."""

    def __init__(self, runtime: OnnxRuntimeModule):
        super().__init__()
        self.runtime = runtime

    def forward(self, **batch):
        return SimpleNamespace(last_hidden_state=self.runtime(**batch))


def minilm_section(rounds: int) -> str:
    import minilm

    warnings.filterwarnings("ignore")
    dense, calibration, evaluation, reference, timing = minilm.setup()
    score = lambda m: minilm.fidelity(m, evaluation, reference)  # noqa: E731
    pruned = copy.deepcopy(dense)
    pangkas.prune_transformer(pruned, calibration[0], heads=0.5, ffn=0.5, data=calibration, reconstruct=True)
    variants = {"full": dense, "heads 50% + FFN 50%": pruned}
    for base in ("full", "heads 50% + FFN 50%"):
        for scheme in ("int8-dynamic", "int8-weight-only"):
            variants[f"{base} + {scheme}"] = pangkas.quantize(variants[base], calibration, scheme)[0]
    rows, timed, labels = [], [], []  # (label, path, cosine, file, compile s) per timed runnable
    for label, model in variants.items():
        compiled, seconds = _compiled(model, timing)
        cosine, size = f"{score(model):.4f}", f"{_file_kib(model):.0f} KiB"
        timed += [model, compiled]
        labels += [(label, "eager", cosine, size, ""), (label, "torch.compile", cosine, size, f"{seconds:.0f}")]
        if "int8" not in label:  # the float model's file, and onnxruntime's int8-dynamic of it
            for name, kind in ((label, None), (f"{label} + int8-dynamic (onnxruntime's quantizer)", "int8-dynamic")):
                data = onnx_bytes(model, calibration[0], quantize=kind, data=calibration if kind else None)[0]
                runtime = OnnxRuntimeModule(data)
                timed.append(runtime)
                labels.append((name, "onnxruntime", f"{score(_Hidden(runtime)):.4f}", f"{len(data) / 2**10:.0f} KiB "
                               "(.onnx)", ""))
        print(label, f"compiled in {seconds:.0f} s", flush=True)
    ratios = latency_ratios(timed, timing, rounds=rounds)
    for i, ((label, path, cosine, size, seconds), ratio) in enumerate(zip(labels, ratios)):
        rows.append((label, path, cosine, "1.00x (baseline)" if i == 0 else ratio.format(), size, seconds))
    table = render_table("MiniLM, batch 8 x 128 tokens: int8 alone and on top of heads + FFN pruning",
                         ("model", "path", "mean cosine to full", "latency vs full eager (95% interval)",
                          "file", "compile s"), rows, markdown=True)
    notes = (f"Measured with {environment()}. Pruning: `prune_transformer(heads=0.5, ffn=0.5, data=..., "
             "reconstruct=True)` on 100 calibration sentences; quantization: `pangkas.quantize(model, calibration, "
             "scheme)` (torchao), and `export_onnx(model, ..., quantize=\"int8-dynamic\")` (onnxruntime's quantizer: "
             "MatMul/Gemm weights in int8 with a scale per output channel, activations quantized at run time); mean "
             "cosine of mean-pooled sentence embeddings to the full model's on 600 sentences (the ONNX files take any "
             f"batch size and sentence length). Latency: {latency_note(rounds)}, every model and path in the same "
             "rounds; `torch.compile` with default options, `compile s` the first two calls (compilation), not timed; "
             "onnxruntime with as many threads as torch. File: `pangkas.save` (int8 weights as int8 data + a scale "
             "per row), or the ONNX file.")
    return "\n\n".join([table, notes])


def _resnet50_paths(label: str, model, float_model, example, calibration) -> tuple[dict, bytes]:
    """path -> (runnable, ONNX MiB or None, compile seconds or None) for one model, and the ONNX
    file profiled for it (float: torch's export; int8: onnxruntime's quantizer's)."""
    paths = {}
    if not label.endswith("int8"):  # int8 in eager mode dequantizes every layer: slower than float
        paths["eager"] = (model, None, None)
    compiled, seconds = _compiled(model, example)
    paths["torch.compile"] = (compiled, None, seconds)
    data = onnx_bytes(model, calibration[0])[0]
    name = "onnxruntime (torch's int8 graph)" if label.endswith("int8") else "onnxruntime"
    paths[name] = (OnnxRuntimeModule(data), len(data) / 2**20, None)
    if label.endswith("int8"):
        data = onnx_bytes(float_model, calibration[0], quantize="int8-static", data=calibration)[0]
        paths["onnxruntime (its quantizer)"] = (OnnxRuntimeModule(data), len(data) / 2**20, None)
    return paths, data


PROFILE_RUNS, PROFILE_WARMUP = 20, 3
GROUPS = ("first convolution", "other convolutions", "residual additions", "the rest")


def _time_by_node_kind(data: bytes, example: torch.Tensor) -> dict[str, float]:
    """Milliseconds per run that onnxruntime's profiler gives each kind of node (the warm-up runs
    left out): the first convolution executed (ResNet's stem, 3 input channels), the other
    convolutions, the residual additions (float ones fuse into their convolution), the rest."""
    import json
    import onnxruntime

    with tempfile.TemporaryDirectory() as folder:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: example.numpy()}
        for _ in range(PROFILE_WARMUP + PROFILE_RUNS):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e["name"] == "model_run")
    nodes = sorted((e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                    and e["ts"] >= starts[PROFILE_WARMUP]), key=lambda e: e["ts"])
    stem = next(e["name"] for e in nodes if "Conv" in e["args"]["op_name"])
    times = dict.fromkeys(GROUPS, 0.0)
    for event in nodes:
        op = event["args"]["op_name"]
        group = (GROUPS[0] if event["name"] == stem else GROUPS[1] if "Conv" in op
                 else GROUPS[2] if op.endswith("Add") else GROUPS[3])
        times[group] += event["dur"] / 1000 / PROFILE_RUNS
    return times


def _profile_rows(batch: int, files: dict[str, bytes], example: torch.Tensor) -> list[tuple]:
    """Per kind of node: each model's milliseconds in onnxruntime, and how much pruning shrank them."""
    times = {label: _time_by_node_kind(data, example) for label, data in files.items()}
    rows = []
    for group in (*GROUPS, "total"):
        ms = {label: sum(t.values()) if group == "total" else t[group] for label, t in times.items()}
        cells = []
        for kind in ("fp32", "int8"):
            dense, pruned = ms[f"dense {kind}"], ms[f"pruned 0.5 {kind}"]
            cells += [f"{dense:.2f}", f"{pruned:.2f}", f"{dense / pruned:.2f}x" if pruned else ""]
        rows.append((batch, group, *cells))
    return rows


def _resnet50_batch(batch: int, rounds: int) -> tuple[list[tuple], list[tuple]]:
    import torchvision

    torch.manual_seed(0)
    dense = torchvision.models.resnet50().eval()
    example = torch.randn(batch, 3, 224, 224)
    calibration = [torch.randn(max(batch, 2), 3, 224, 224) for _ in range(4)]
    pruned = copy.deepcopy(dense)
    pangkas.prune_channels(pruned, calibration[0], ratio=0.5)
    floats = {"dense": dense, "pruned 0.5": pruned}
    variants, fidelity = {}, {}
    for base, model in floats.items():
        variants[f"{base} fp32"] = (model, model)
    for base, model in floats.items():
        int8, report = pangkas.quantize(model, calibration, "int8-static", example_inputs=calibration[0])
        variants[f"{base} int8"] = (int8, model)
        fidelity[f"{base} int8"] = f"{report.fidelity:.4f}"
    timed, labels, extra, files = [], [], {}, {}
    for label, (model, float_model) in variants.items():
        paths, files[label] = _resnet50_paths(label, model, float_model, example, calibration)
        for path, (runnable, mib, seconds) in paths.items():
            timed.append(runnable)
            labels.append((label, path))
            extra[label, path] = (mib, seconds)
        print(batch, label, "ready", flush=True)
    ratios = latency_ratios(timed, example, rounds=rounds)
    best = {}
    for (label, path), ratio in zip(labels, ratios):
        if label not in best or ratio.value < best[label][1].value:
            best[label] = (path, ratio)
    gain = {label: best["dense fp32"][1].value / r.value for label, (_, r) in best.items()}  # vs dense, best paths
    rows = []
    for (label, path), ratio in zip(labels, ratios):
        mib, seconds = extra[label, path]
        rows.append((batch, label, path, "1.00x (baseline)" if (label, path) == labels[0] else ratio.format(),
                     "best" if best[label][0] == path else "", fidelity.get(label, "") if "its" not in path else "",
                     "" if mib is None else f"{mib:.1f} MiB", "" if seconds is None else f"{seconds:.0f}"))
    product = gain["pruned 0.5 fp32"] * gain["dense int8"]
    rows.append((batch, "pruned 0.5 int8: speed-up vs dense (best paths)", "",
                 f"{gain['pruned 0.5 int8']:.2f}x; pruning's x int8's: {gain['pruned 0.5 fp32']:.2f} x "
                 f"{gain['dense int8']:.2f} = {product:.2f}x; share {gain['pruned 0.5 int8'] / product:.2f}",
                 "", "", "", ""))
    return rows, _profile_rows(batch, files, example)


def resnet50_section(rounds: int) -> str:
    torch._inductor.config.freezing = True  # lets inductor fold int8 weights into its quantized conv kernels
    rows, profile = [], []
    for batch in (1, 8):
        timed, profiled = _resnet50_batch(batch, rounds)
        rows += timed
        profile += profiled
    table = render_table("ResNet-50 (random weights): pruning at 0.5, int8-static, and both, on each deployment path",
                         ("batch", "model", "path", "latency vs dense fp32 eager (95% interval)", "best path",
                          "int8 vs float: mean cosine", "ONNX file", "compile s"), rows, markdown=True)
    notes = (f"Measured with {environment()}. Pruning: `prune_channels(ratio=0.5)`; int8: "
             "`pangkas.quantize(model, 4 random batches, \"int8-static\")` (torchao PT2E, x86 inductor quantizer), "
             "run under `torch.compile` and exported to ONNX (`onnxruntime (torch's int8 graph)`); and "
             "`export_onnx(float_model, ..., quantize=\"int8-static\", data=the same 4 batches)` (onnxruntime's own "
             "quantizer: per-channel int8 weights, uint8 activations, QDQ; `onnxruntime (its quantizer)`). "
             "Paths: eager PyTorch (float models only: an int8 graph in eager mode dequantizes every layer), "
             "`torch.compile` with inductor freezing on, and onnxruntime (as many threads as torch). "
             f"Latency: {latency_note(rounds)}, every model and path in the same rounds. Speed-ups "
             "are of each model on its best path, against the dense model on its best path; `share`: the stacked "
             "model's speed-up over the product of pruning's and int8's. `mean cosine`: of torchao's int8 model's "
             "outputs to its float model's on the calibration batches (random weights, so no accuracy); onnxruntime's "
             "int8 files are checked against the float model before use (export_onnx: the float export at a mean "
             "cosine of 0.99, the int8 file at 0.9).")
    where = render_table("Where the time goes in onnxruntime: milliseconds per run by kind of node, and pruning's shrink",
                         ("batch", "nodes", "dense fp32 ms", "pruned fp32 ms", "fp32 shrink", "dense int8 ms",
                          "pruned int8 ms", "int8 shrink"), profile, markdown=True)
    where_notes = (f"onnxruntime's own profiler (kernel time per node, {PROFILE_RUNS} runs after {PROFILE_WARMUP} "
                   "warm-up runs, one process; not interleaved, so read the ratios, not the absolute times): the "
                   "float files as exported, the int8 files from onnxruntime's quantizer. `first convolution`: "
                   "ResNet's 7x7 stem on 3 input channels; `residual additions`: float additions are fused into "
                   "their convolution, int8 ones run as QLinearAdd. The share of the stacked speed-up is the int8 "
                   "shrink over the fp32 shrink (each on its best path): where int8 kernels shrink less than float "
                   "ones on halved channels, the share falls below 1.")
    return "\n\n".join([table, notes, where, where_notes])


def _effective(weight: torch.Tensor) -> torch.Tensor:
    """The weight a layer computes with: an int8 one de-quantized (qdata x scale)."""
    from pangkas.quant_schemes import is_torchao

    return weight.dequantize() if is_torchao(weight) else weight.detach()


def llm_section(rounds: int) -> str:
    import llm
    import transformers
    from pangkas.evaluate import perplexity

    warnings.filterwarnings("ignore")
    dense, tokenizer = llm.load_model()
    calib, evaluation = llm.texts(tokenizer)
    ppl = lambda m: perplexity(m, evaluation, window=llm.WINDOW, batch_size=8)  # noqa: E731
    sparse = copy.deepcopy(dense)
    start = time.perf_counter()
    pangkas.prune_weights(sparse, importance="sparsegpt", pattern="2:4", include=llm.LAYERS, data=calib)
    pangkas.finalize(sparse)
    sparse_s = time.perf_counter() - start
    int8 = lambda m: pangkas.quantize(m, calib[:4], "int8-weight-only", exclude=["lm_head"])[0]  # noqa: E731
    variants = {"dense": dense, "2:4 SparseGPT": sparse, "int8 weight-only": int8(dense),
                "2:4 SparseGPT + int8 weight-only": int8(sparse)}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, model in variants.items():
            out = Path(folder) / label.replace(" ", "_").replace(":", "")
            written = pangkas.export_compressed_tensors(model, out)
            size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors") / 2**20
            loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # compressed-tensors decompresses
            with torch.no_grad():
                loaded(**calib[0])
            same = all(torch.equal(loaded.get_submodule(n).weight, _effective(model.get_submodule(n).weight))
                       for n in written.linear)
            rows.append((label, f"{ppl(model):.2f}", f"{ppl(loaded):.2f}", written.format, f"{size:.1f} MiB",
                         "yes" if same else "no", len(written.two_four)))
            print(rows[-1], flush=True)
    table = render_table("SmolLM2-135M: 2:4 sparsity, int8 weights and both, written as compressed-tensors",
                         ("model", "perplexity", "perplexity as reloaded", "format", "weights file",
                          "reloaded weights identical", "2:4 layers"), rows, markdown=True)
    notes = (f"Measured with {environment()}. 2:4: `prune_weights(importance=\"sparsegpt\", pattern=\"2:4\")` on "
             f"the decoder layers' Linears, 32 x 256 tokens of Emma ({sparse_s:.0f} s); int8: `pangkas.quantize(..., "
             "\"int8-weight-only\", exclude=[\"lm_head\"])` (the head shares the embeddings' weights). Perplexity on "
             "24 x 256 tokens of Persuasion. Written with `pangkas.export_compressed_tensors`, reloaded with "
             "`transformers.AutoModelForCausalLM.from_pretrained` (compressed-tensors decompresses the weights); "
             "`identical`: every Linear weight equal, bit for bit, to pangkas's (int8: qdata x scale). The 2:4 "
             "weights are stored with their zeros: compressed-tensors 0.20 and vLLM no longer read a 2:4 sparse "
             "format.")
    return "\n\n".join([table, notes])


SECTIONS = {"minilm": minilm_section, "resnet50": resnet50_section, "llm": llm_section}
TITLES = {"minilm": "quantize: MiniLM in int8, alone and after pruning",
          "resnet50": "quantize: ResNet-50 pruned and in int8, on each deployment path",
          "llm": "quantize: SmolLM2 with 2:4 sparsity and int8 weights, as compressed-tensors"}


def main() -> None:
    run_sections(__doc__, "quantize", SECTIONS, TITLES, "quantize.py")


if __name__ == "__main__":
    main()
