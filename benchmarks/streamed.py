"""Streamed pruning measured: synthetic LLaMA checkpoints written shard by shard (never whole in
memory), and each pruning run in a fresh process that reports its time and its peak resident
memory above its own post-import baseline. Used by scale.py.

    .venv/bin/python benchmarks/streamed.py CHILD JSON   # one measured run (what scale.py starts)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import memory

SHARD_BYTES = 2 * 2**30  # hub checkpoints come in shards of a few GB


def llama_config(layers: int, hidden: int = 2048, intermediate: int = 5504, heads: int = 32, kv_heads: int = 8,
                 vocab: int = 32000):
    import transformers

    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                    num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                    architectures=["LlamaForCausalLM"], torch_dtype="float32")


def write_checkpoint(directory: Path, config, seed: int = 0) -> int:
    """A random-weight checkpoint of ``config`` (normal(0, 0.02) matrices, unit norms) in shards of
    ``SHARD_BYTES`` with an index, one shard in memory at a time; returns its bytes."""
    import transformers
    from accelerate import init_empty_weights

    directory.mkdir(parents=True, exist_ok=True)
    with init_empty_weights():
        shapes = {k: v.shape for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    shards, current, size = [], {}, 0
    for key, shape in shapes.items():
        tensor = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
        if current and size + tensor.nbytes > SHARD_BYTES:
            shards.append(_flush(directory, current, len(shards)))
            current, size = {}, 0
        current[key], size = tensor, size + tensor.nbytes
    shards.append(_flush(directory, current, len(shards)))
    names = {old: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, (old, _) in enumerate(shards)}
    weight_map = {}
    for old, keys in shards:
        (directory / old).rename(directory / names[old])
        weight_map.update(dict.fromkeys(keys, names[old]))
    total = sum((directory / n).stat().st_size for n in names.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(directory)
    return total


def _flush(directory: Path, tensors: dict, index: int) -> tuple[str, list[str]]:
    from safetensors.torch import save_file

    name = f"shard-{index}.tmp.safetensors"
    save_file(tensors, str(directory / name), metadata={"format": "pt"})
    return name, list(tensors)


def calibration(vocab: int, sequences: int = 32, tokens: int = 256, batch: int = 8) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (sequences, tokens), generator=generator)
    return list(ids.split(batch))


def measured(job: dict, threads: int = 1) -> dict:
    """Run ``job`` in a fresh process: {seconds, baseline_bytes, peak_bytes, ...}."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "CHILD", json.dumps(job)], capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{job['kind']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(job: dict) -> dict:
    import transformers

    import pangkas
    import pangkas.stream

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    transformers.LlamaForCausalLM  # noqa: B018 -- transformers imports its model code on first use: an import too
    data = calibration(job["vocab"], job["sequences"], job["tokens"])
    baseline = memory()  # after the imports and the calibration tokens: what any run holds
    start = time.perf_counter()
    kind, source, out = job["kind"], job["source"], job["output"]
    if kind == "stream_weights":
        pangkas.stream.prune_weights(source, out, importance="sparsegpt", sparsity=0.5, data=data, exclude="lm_head")
    elif kind == "memory_weights":
        model = transformers.LlamaForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        pangkas.prune_weights(model, importance="sparsegpt", sparsity=0.5, data=data, exclude="lm_head")
        pangkas.finalize(model).save_pretrained(out)
    elif kind == "stream_structure":
        pangkas.stream.prune_transformer(source, out, heads=0.25, ffn=0.25, importance="wanda", data=data)
    elif kind == "memory_structure":
        model = transformers.LlamaForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        pangkas.prune_transformer(model, data[0], heads=0.25, ffn=0.25, importance="wanda", data=data)
        pangkas.save_pretrained(model, out)
    else:
        raise ValueError(kind)
    seconds = time.perf_counter() - start
    peak = memory("VmHWM")
    return {"seconds": seconds, "baseline_bytes": baseline, "peak_bytes": peak}


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two checkpoint directories hold the same tensors (read one tensor at a time)."""
    from pangkas.stream.checkpoint import Checkpoint

    first, second = Checkpoint(a), Checkpoint(b)
    if sorted(first.keys()) != sorted(second.keys()):
        return False
    return all(torch.equal(first.tensor(k), second.tensor(k)) for k in first.keys())


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "CHILD":
    print(json.dumps(_child(json.loads(sys.argv[2]))))
