"""Streamed weight pruning: a checkpoint directory in, a pruned checkpoint directory out, with one
block of the model in memory at a time.

The model is built on ``meta``. For one-shot criteria (Wanda, SparseGPT) the first block's inputs
are captured from the data (only the modules that forward pass reaches, the embeddings, are loaded
for it); then each block is loaded from the shards, pruned on the inputs it really receives exactly
as ``pangkas.prune_weights`` does in memory (same code, same order: the same weights bit for bit),
written as its own shard, run to give the next block its inputs, and released. The tensors outside
the blocks (embeddings, final norm, head) are copied one module at a time. A crash loses at most
the block in progress: the same call continues from the shards written (``stream.output``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..blockwise import blocks_of, next_inputs, read_by
from ..errors import PangkasError
from ..modules import Selector
from ..progress import track
from ..weights.criteria import CalibratedImportance
from ..weights.masks import get_mask
from ..weights.oneshot import _prune_layers
from ..weights.prune import LayerSparsity, WeightReport, _new_masks, _targets, _validate, parse_pattern
from .checkpoint import Checkpoint, materialize, release, skeleton
from .output import ResumableOutput
from .walk import block_of, check_memory, fingerprint, first_inputs, outside_units


def prune_weights(directory: str | Path, output: str | Path, *, sparsity: float | None = None,
                  threshold: float | None = None, pattern: str | None = None, importance="magnitude",
                  data: Iterable | None = None, include: Selector = None, exclude: Selector = None,
                  max_memory: int | str | None = None, overwrite: bool = False) -> WeightReport:
    """Prune the weights of the Hugging Face checkpoint in ``directory`` (config.json + safetensors
    shards) into a checkpoint directory ``output`` that ``from_pretrained`` loads, holding one block
    in memory at a time. The rules and criteria are ``pangkas.prune_weights``' (per layer: the
    global scope ranks every weight at once and is not available), and so is the result, bit for
    bit. Only layers inside the repeated blocks are pruned: the others (the LM head) are kept, as
    the report says (naming one in ``include=`` is refused). ``max_memory``: refuse up front when
    the estimated peak (a block, its calibration statistics and activations) exceeds it. Run again
    after a crash or interrupt to continue from the last block written."""
    criterion = _validate(sparsity, threshold, pattern, "local", importance, data)
    source = Checkpoint(directory)
    model, _ = skeleton(directory)
    blocks = blocks_of(model)
    if not blocks:
        raise PangkasError(f"{type(model).__name__} has no repeated blocks to stream one at a time")
    targets, skipped = _in_blocks(model, blocks, include, exclude)
    batches = list(data) if isinstance(criterion, CalibratedImportance) else []
    if max_memory is not None:
        check_memory(model, blocks, source, batches, getattr(criterion, "gram", False), max_memory)
    rest = outside_units(model, blocks, source)
    options = ("weights", criterion.name, sparsity, threshold, pattern, repr(include), repr(exclude))
    out = ResumableOutput(output, [*blocks, *rest], fingerprint(source, options, batches), source=Path(directory),
                          overwrite=overwrite)
    rule = (f"sparsity={sparsity} (local)" if sparsity is not None else f"threshold={threshold}"
            if threshold is not None else f"pattern={pattern}") + f", importance={criterion.name}, streamed"
    with torch.no_grad():
        _stream_blocks(model, blocks, dict(targets), source, out, criterion, sparsity, threshold, pattern, batches)
        for unit, keys in rest.items():
            if out.done(unit) is None:
                tensors = source.tensors(keys)
                out.write(unit, tensors, _counts(model, tensors))
    report = _report(rule, [out.done(u) for u in out.units], skipped)
    out.finish(lambda staging: shutil.copy2(Path(directory) / "config.json", staging / "config.json"))
    return report


def _in_blocks(model, blocks, include, exclude) -> tuple[list, dict]:
    """(the selected layers inside the blocks, the skipped ones with why): those outside are kept."""
    targets, skipped = _targets(model, include, exclude)
    outside = [name for name, _ in targets if block_of(name, blocks) is None]
    if outside and include is not None:
        raise PangkasError(f"{outside[:3]} are outside the repeated blocks ({blocks[0]}, ...), which is all streamed "
                           "pruning prunes: leave them out of include=")
    skipped.update(dict.fromkeys(outside, "outside the repeated blocks: streamed pruning prunes the blocks' layers"))
    targets = [(name, module) for name, module in targets if name not in outside]
    if not targets:
        raise PangkasError(f"no selected layer is inside the repeated blocks ({blocks[0]}, ...); "
                           "check include=/exclude=")
    return targets, skipped


def _stream_blocks(model, blocks, targets, source, out, criterion, sparsity, threshold, pattern, batches) -> None:
    calibrated = isinstance(criterion, CalibratedImportance)
    captured = first_inputs(model, blocks, source, batches) if calibrated else None
    for name in track(blocks, f"{criterion.name}: pruning block by block (streamed)"):
        block = model.get_submodule(name)
        if out.done(name) is None:
            materialize(block, name, source)
            layers = {n: m for n, m in targets.items() if block_of(n, blocks) == name}
            _write_pruned(model, block, name, layers, out, captured, criterion, sparsity, threshold, pattern)
        else:
            materialize(block, name, out.written())  # pruned already: its outputs feed the next block
        if calibrated and name != blocks[-1]:
            captured = next_inputs(block, captured)
        release(block)


def _write_pruned(model, block, name, layers, out, captured, criterion, sparsity, threshold, pattern) -> None:
    """Prune ``block`` (loaded) and write its shard; nothing of it is held after (a function of
    its own, so no local keeps the block's tensors alive once it is released)."""
    before = _nonzero(layers)
    if captured is not None:
        _pruned_on_inputs(block, layers, captured, criterion, sparsity, pattern)
    else:
        _pruned_by_weights(layers, criterion, sparsity, threshold, pattern)
    tensors = {f"{name}.{key}": t for key, t in block.state_dict().items()}
    out.write(name, tensors, {**_counts(model, tensors, before), "layers": [
        [n, list(m.weight.shape), before[n], int(torch.count_nonzero(m.weight))] for n, m in layers.items()]})


def _pruned_on_inputs(block, layers, captured, criterion, sparsity, pattern) -> None:
    """What ``calibrated_masks`` does to one block, applied: where a mask removes, zero."""
    n_m = parse_pattern(pattern) if pattern else None
    results = _prune_layers(layers, lambda: read_by(block, list(layers.values()), captured),
                            criterion, sparsity, n_m, get_mask)
    for name, (weight, keep) in results.items():
        param = layers[name].weight
        param.data = torch.where(keep, weight if weight is not None else param.detach(), 0.0)


def _pruned_by_weights(layers, criterion, sparsity, threshold, pattern) -> None:
    items = list(layers.items())
    weights = [m.weight for _, m in items]
    masks = _new_masks(items, weights, [None] * len(items), criterion, sparsity, threshold, pattern, "local")
    for (_, module), mask in zip(items, masks):
        module.weight.data = torch.where(mask, module.weight.detach(), 0.0)


def _nonzero(layers: dict[str, nn.Module]) -> dict[str, int]:
    return {n: int(torch.count_nonzero(m.weight)) for n, m in layers.items()}


def _counts(model: nn.Module, tensors: dict[str, torch.Tensor], before: dict[str, int] | None = None) -> dict:
    """Parameters among ``tensors`` and their non-zeros now (and before, where layers changed)."""
    parameters = {n for n, _ in model.named_parameters()}
    counted = {k: t for k, t in tensors.items() if k in parameters}
    nonzero = sum(int(torch.count_nonzero(t)) for t in counted.values())
    changed = sum(before.values()) - sum(int(torch.count_nonzero(tensors[f"{n}.weight"])) for n in before) \
        if before else 0
    return {"params": sum(t.numel() for t in counted.values()), "nonzero_after": nonzero,
            "nonzero_before": nonzero + changed, "layers": []}


def _report(rule: str, records: list[dict], skipped: dict) -> WeightReport:
    layers = tuple(LayerSparsity(n, tuple(shape), b, a) for r in records for n, shape, b, a in r["layers"])
    return WeightReport(rule, layers, sum(r["params"] for r in records),
                        sum(r["nonzero_before"] for r in records), sum(r["nonzero_after"] for r in records), skipped)
