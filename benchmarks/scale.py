"""Models larger than memory: what pangkas can plan and cut without holding the weights.

Sections (each writes its own page under docs/scale/):

- ``plans``: LLaMA-3-8B and a LLaMA-3-70B config built on the ``meta`` device (the published
  configs, no weights): the structure-only plan (``plan_transformer`` with heads, FFN and hidden
  size), each group's unit cost (``Plan.unit_cost``) and the removable blocks
  (``layer_candidates``), each config measured in a fresh process: seconds (wall and CPU) and
  peak RSS above that process's RSS once torch, transformers and pangkas are imported; then the
  units: which channels go together, how many, how many may go, what one costs.

- ``stream``: a synthetic LLaMA-architecture checkpoint of over 6 GB in fp32 (random weights,
  written by ``streamed.py`` in 2 GB shards with an index, like hub checkpoints), pruned by
  ``pangkas.stream``: SparseGPT 50% and heads/FFN (Wanda), each in a fresh process; seconds and
  peak RSS above that process's post-import baseline, as a share of the checkpoint (target <= 25%).
- ``fits``: a checkpoint of the same width that fits in memory, pruned both ways (in memory:
  ``from_pretrained``, prune, ``save_pretrained``; streamed), each in a fresh process: the two
  output directories compared tensor by tensor, and the time ratio (target: streamed within 1.3x).

Calibration: 32 sequences x 256 random token ids (random weights: only memory, time and equality
are measured here; quality is the LLM benchmark's). Threads: 1.

    .venv/bin/python benchmarks/scale.py --sections plans
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from common import environment, memory, run_sections
from pangkas.tables import human_count, render_table

# The published configs (config.json of meta-llama/Meta-Llama-3-8B and -70B)
CONFIGS = {
    "LLaMA-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8),
    "LLaMA-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8),
}
SHARED = dict(vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
              tie_word_embeddings=False)
TOKENS = 128  # the example input: one sequence of this many token ids
AMOUNTS = dict(heads=0.25, ffn=0.25, hidden=0.25)  # any amounts: the structure does not depend on them
TARGET_SECONDS, TARGET_GB = 10, 2


def _in_child(function: str, *args) -> dict:
    """Run ``function(*args)`` of this script in a fresh Python process; its JSON result."""
    here = str(Path(__file__).resolve().parent)
    code = f"import sys; sys.path.insert(0, {here!r}); import scale, json; print(json.dumps(scale.{function}(*{args!r})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{function}{args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- plans: run in a child process per config ----------------------------------------------------

def measure_plan(config: str) -> dict:
    """Build ``config`` on meta, plan it, cost its units, find its blocks: timings, RSS, units."""
    import time

    import torch
    import transformers
    from transformers.models.llama import modeling_llama  # noqa: F401  (imported before the baseline)

    from torch._subclasses.fake_tensor import FakeTensorMode

    import pangkas

    torch.set_num_threads(1)
    out = {"baseline": memory()}

    def timed(key, fn):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        out[key] = (time.perf_counter() - wall, time.process_time() - cpu)
        return result

    def build():
        with torch.device("meta"):
            return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIGS[config], **SHARED)).eval()

    model = timed("build", build)
    example = torch.zeros(1, TOKENS, dtype=torch.long)
    plan = timed("plan", lambda: pangkas.plan_transformer(model, example, **AMOUNTS))
    kinds = _kinds(plan)
    costs = timed("costs", lambda: {kind: plan.channels.unit_cost(groups[0]) for kind, groups in kinds.items()})
    with FakeTensorMode(allow_non_fake_inputs=True):  # on meta alone, the mask code calls Tensor.item()
        blocks = timed("blocks", lambda: pangkas.layer_candidates(model, example))
    out["peak"] = memory("VmHWM")
    out["params"] = plan.channels.params_before
    out["units"] = _units(plan, kinds, costs, blocks)
    return out


def _kinds(plan) -> dict:
    """The plan's groups by unit (heads, ffn, hidden), in order; groups of no unit are left out."""
    kinds = {unit: [] for unit in plan.units}
    for group in plan.channels.selection.groups:
        kind = next((unit for unit, names in plan.units.items() if set(names) & set(group.modules)), None)
        if kind is not None:
            kinds[kind].append(group)
    return kinds


def _units(plan, kinds: dict, costs: dict, blocks) -> list[dict]:
    """One row per kind of unit: groups, units per group, removable per group, cost of one unit."""
    config = plan.channels.model.config
    per_kv = config.num_attention_heads // config.num_key_value_heads
    rows = []
    for kind, groups in kinds.items():
        sizes = {len(g.classes) for g in groups}
        assert len(sizes) == 1, f"{kind}: groups of different sizes {sizes}"
        size = sizes.pop()
        if kind == "heads":
            assert size == config.num_key_value_heads  # a unit is a key/value group and its query heads
            unit = f"key/value group ({per_kv} query heads + 1 key/value head)"
            removable = f"0-{size - 1} ({', '.join(str(per_kv * n) for n in range(size))} heads)"
        else:
            unit = {"ffn": "FFN neuron", "hidden": "hidden channel"}[kind]
            unit += " (approximate: RMSNorm)" if any(g.approximate for g in groups) else ""
            removable = f"0-{size - 1}"
        params, macs = costs[kind]
        rows.append(dict(unit=unit, groups=len(groups), size=size, removable=removable, params=params, macs=macs))
    layers = [b for b in blocks if "layer list" in b.kinds]
    costs = {(b.params, _block_macs(plan, b.name)) for b in layers}
    assert len(costs) == 1, "decoder layers of different costs"
    params, macs = costs.pop()
    rows.append(dict(unit="decoder layer (block)", groups=1, size=len(layers), removable=f"0-{len(layers)}",
                     params=params, macs=macs))
    return rows


def _block_macs(plan, block: str) -> int:
    """MACs of the traced ops run inside ``block`` (as the unit costs count them)."""
    from pangkas.graph.trace import count_flops

    inside = [r for r in plan.channels.coupling.records if r.module == block or r.module.startswith(block + ".")]
    return count_flops(inside) // 2


# -- plans: the page ------------------------------------------------------------------------------

def plans_section(rounds: int) -> str:
    del rounds  # nothing here is a latency
    results = {config: _in_child("measure_plan", config) for config in CONFIGS}
    gib = 2 ** 30
    timing = render_table(
        "Structure-only plans on meta (no weights): seconds and memory, each config in a fresh process",
        ("config", "params", "build s", "plan s (CPU s)", "unit costs s", "blocks s", "total s",
         "peak RSS above baseline", "baseline RSS"),
        [(config, human_count(r["params"]), f"{r['build'][0]:.2f}", f"{r['plan'][0]:.2f} ({r['plan'][1]:.2f})",
          f"{r['costs'][0]:.2f}", f"{r['blocks'][0]:.2f}",
          f"{sum(r[k][0] for k in ('build', 'plan', 'costs', 'blocks')):.2f}",
          f"{(r['peak'] - r['baseline']) / gib:.2f} GiB", f"{r['baseline'] / gib:.2f} GiB")
         for config, r in results.items()], markdown=True)
    units = [render_table(f"{config}: units (costs at {TOKENS} tokens)",
                          ("unit", "groups", "units per group", "removable per group", "params per unit",
                           "MACs per unit"),
                          [(u["unit"], u["groups"], u["size"], u["removable"], human_count(u["params"]),
                            human_count(u["macs"])) for u in r["units"]], markdown=True)
             for config, r in results.items()]
    notes = (f"Measured with {environment()}, on a machine shared with other jobs: wall seconds count the time "
             "others held the CPU, CPU seconds do not. Each config runs in a fresh process: `build` makes "
             f"`LlamaForCausalLM` under `torch.device(\"meta\")`; `plan` is `plan_transformer(model, ids, "
             f"heads=0.25, ffn=0.25, hidden=0.25)` on {TOKENS} token ids (trace, selection, and the rehearsal "
             "that cuts a weightless copy and re-traces it); `unit costs` is `plan.channels.unit_cost(group)` "
             "for one group of each kind; `blocks` is `pangkas.layer_candidates` (under `FakeTensorMode`: on "
             "meta tensors alone transformers' mask code calls `Tensor.item()`), its MACs counted on the plan's "
             "trace like the unit costs. Peak RSS is "
             "the process's peak resident memory (`VmHWM`) minus its resident memory once torch, transformers "
             "and pangkas are imported. "
             f"Target: under {TARGET_SECONDS} s and {TARGET_GB} GB each. On meta every channel's importance "
             "is its position (no weights to rank): ranking comes when the weights do. A group is "
             "what goes together: a layer's heads (in whole key/value groups: grouped-query attention "
             "stays valid), a layer's FFN neurons, the hidden size of the whole residual stream (one "
             "group; approximate, as RMSNorm's statistics change). Every group keeps at least one unit. "
             "Per-unit costs are what removing one unit of the first group of each kind saves (every "
             "layer is built alike; their groups' sizes and the blocks' costs are checked equal).")
    return "\n\n".join([timing, *units, notes])


# -- stream / fits: pruning checkpoints streamed, block by block ----------------------------------

STREAM_LAYERS, FITS_LAYERS = 32, 4  # at hidden 2048, FFN 5504: 6.2 GB and 1.2 GB in fp32
RUNS = {"weights": ("SparseGPT 50% (exclude lm_head)", "stream_weights", "memory_weights"),
        "structure": ("heads 25% + FFN 25% (Wanda)", "stream_structure", "memory_structure")}
MEMORY_SHARE = 0.25
TIME_RATIO = 1.3


def _checkpoint(layers: int, root: Path) -> tuple[Path, int, dict]:
    import streamed

    config = streamed.llama_config(layers)
    path = root / "in"
    size = streamed.write_checkpoint(path, config)
    return path, size, {"vocab": config.vocab_size, "sequences": 32, "tokens": 256, "source": str(path)}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def stream_section(rounds: int) -> str:
    import tempfile

    import streamed

    del rounds
    with tempfile.TemporaryDirectory() as root:
        source, size, job = _checkpoint(STREAM_LAYERS, Path(root))
        rows = []
        for what, kind, _ in RUNS.values():
            r = streamed.measured({**job, "kind": kind, "output": str(Path(root) / kind)})
            share = (r["peak_bytes"] - r["baseline_bytes"]) / size
            rows.append((what, _gib(size), f"{r['seconds']:.0f}", _gib(r["peak_bytes"] - r["baseline_bytes"]),
                         f"{share:.1%}", "yes" if share <= MEMORY_SHARE else "no"))
    table = render_table(f"Streamed pruning of a {STREAM_LAYERS}-layer LLaMA checkpoint that is never in memory "
                         "whole: time and peak memory, each run in a fresh process",
                         ("pruning", "checkpoint (fp32)", "seconds", "peak RSS above baseline",
                          "share of checkpoint", f"<= {MEMORY_SHARE:.0%}"), rows, markdown=True)
    c = streamed.llama_config(STREAM_LAYERS)
    block = 4 * (2 * c.hidden_size ** 2 + 2 * c.hidden_size * c.hidden_size // c.num_attention_heads
                 * c.num_key_value_heads + 3 * c.hidden_size * c.intermediate_size)
    notes = (f"Measured with {environment()}, on a machine shared with other jobs. The checkpoint: "
             f"LlamaForCausalLM, {c.num_hidden_layers} layers, hidden {c.hidden_size}, FFN {c.intermediate_size}, "
             f"{c.num_attention_heads} heads ({c.num_key_value_heads} key/value), vocabulary {c.vocab_size:,}, fp32 "
             "random weights, 2 GB shards with an index. Peak RSS: the process's peak resident memory (`VmHWM`) "
             "minus its resident memory once torch, transformers, pangkas and the model code are imported (and the "
             f"calibration tokens made). What is resident at the peak: one block ({block / 2**20:.0f} MB) and "
             "its layers' input statistics (SparseGPT: Gram matrices, "
             f"{4 * c.intermediate_size ** 2 / 2**20:.0f} MB for the down projection, and the algorithm's working "
             f"copies of it), and the calibration activations (32 x 256 x {c.hidden_size} floats in and out).")
    return "\n\n".join([table, notes])


def fits_section(rounds: int) -> str:
    import tempfile

    import streamed

    del rounds
    with tempfile.TemporaryDirectory() as root:
        source, size, job = _checkpoint(FITS_LAYERS, Path(root))
        rows = []
        for what, stream_kind, memory_kind in RUNS.values():
            results = {kind: streamed.measured({**job, "kind": kind, "output": str(Path(root) / kind)})
                       for kind in (memory_kind, stream_kind)}
            same = streamed.same_tensors(Path(root) / memory_kind, Path(root) / stream_kind)
            ratio = results[stream_kind]["seconds"] / results[memory_kind]["seconds"]
            memory = {k: _gib(r["peak_bytes"] - r["baseline_bytes"]) for k, r in results.items()}
            rows.append((what, f"{results[memory_kind]['seconds']:.0f}", f"{results[stream_kind]['seconds']:.0f}",
                         f"{ratio:.2f}x", "yes" if ratio <= TIME_RATIO else "no", memory[memory_kind],
                         memory[stream_kind], "identical" if same else "DIFFERENT"))
    table = render_table(f"In memory vs streamed, on a {FITS_LAYERS}-layer checkpoint that fits ({_gib(size)} fp32)",
                         ("pruning", "in memory s", "streamed s", "streamed / in memory", f"<= {TIME_RATIO}x",
                          "in memory: peak RSS above baseline", "streamed: peak RSS above baseline",
                          "output tensors"), rows, markdown=True)
    notes = (f"Measured with {environment()}, on a machine shared with other jobs: the two runs of a row are "
             "consecutive, not interleaved, so the ratio carries that noise. In memory: `from_pretrained`, "
             "`prune_weights` / `prune_transformer`, `save_pretrained`; streamed: `pangkas.stream.prune_weights` / "
             "`prune_transformer` into a directory; both include reading and writing. Peak RSS as in the stream "
             "section (`VmHWM` minus the post-import resident memory). `output tensors`: every tensor of the two "
             "output directories compared with `torch.equal`.")
    return "\n\n".join([table, notes])


SECTIONS = {"plans": plans_section, "stream": stream_section, "fits": fits_section}
TITLES = {"plans": "scale: structure-only plans of LLaMA-3-8B and -70B on meta",
          "stream": "scale: pruning a checkpoint larger than the memory it may use",
          "fits": "scale: streamed vs in-memory pruning, where both fit"}


def main() -> None:
    run_sections(__doc__, "scale", SECTIONS, TITLES, "scale.py")


if __name__ == "__main__":
    main()
