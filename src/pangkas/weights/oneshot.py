"""One-shot pruning from calibration data, one block at a time (``CalibratedImportance``).

The model is cut into its repeated blocks (a ``ModuleList`` of layers, or the blocks layer
pruning finds); the first block's inputs are captured from ``data``, each block is pruned on the
inputs it really receives, and its pruned outputs become the next block's inputs, so errors do
not compound unseen and memory holds one block's activations. Layers outside the blocks (stems,
heads) are pruned on inputs captured in one pass of the whole model.

The criteria themselves (``wanda.py``, ``sparsegpt.py``) see one layer at a time: its weight as
(rows, inputs) with input channels innermost, and the statistics of its inputs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..activations import InputStatistics, recording
from ..blockwise import LAYERS, blocks_of, first_block_inputs, next_inputs, read_by
from ..errors import PangkasError
from ..inputs import call_model
from ..modules import evaluating
from ..progress import track
from .criteria import CalibratedImportance, finite
from .masks import underlying_parameter

def _weight2d(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().float().reshape(module.weight.shape[0], -1)


def _channels_last(module: nn.Module) -> torch.Tensor | None:
    """Column order putting input channels innermost (N:M groups run along input channels, as in
    magnitude N:M); None for Linear, whose columns already are (no copies of weight and Hessian)."""
    if isinstance(module, nn.Linear):
        return None
    c, kh, kw = module.weight.shape[1:]
    return torch.arange(c * kh * kw).reshape(c, kh, kw).permute(1, 2, 0).flatten()


@torch.no_grad()
def _prune_layers(layers: dict[str, nn.Module], run, criterion: CalibratedImportance, sparsity, n_m,
                  masks_of) -> dict:
    """Collect input statistics of ``layers`` while ``run()`` runs, then compute their masks
    (and possibly new weights). Returns {name: (weight or None, keep mask)}."""
    with recording(layers, gram=criterion.gram) as stats:
        run()
    results = {}
    for name, module in layers.items():
        stat = stats.pop(name)  # freed once used: SparseGPT's Gram matrices are the biggest thing held here
        if stat.total is None:
            continue  # not reached by the calibration data: keep as is
        try:
            results[name] = _layer_result(module, stat, criterion, sparsity, n_m, masks_of)
        except (PangkasError, torch.linalg.LinAlgError) as exc:
            raise PangkasError(f"importance={criterion.name!r} cannot prune {name}: {exc}") from exc
    return results


def _layer_result(module, stats: InputStatistics, criterion: CalibratedImportance, sparsity, n_m, masks_of):
    """(new weight or None, keep mask) of one layer from its input statistics."""
    finite(stats.total, "the statistics of its inputs")
    perm = _channels_last(module)
    w = _weight2d(module)  # may share the parameter's memory: criteria must not write into it
    old = masks_of(module)
    old = None if old is None else old.reshape(w.shape[0], -1)
    if perm is not None:
        w, old, stats = w[:, perm], None if old is None else old[:, perm], stats.reordered(perm)
    shape = module.weight.shape
    new, keep = criterion.prune_rows(w, stats, old, sparsity, n_m)
    back = slice(None) if perm is None else torch.argsort(perm)
    keep = keep[:, back].reshape(shape)
    if new is None:
        return None, keep
    return finite(new[:, back].reshape(shape).to(module.weight.dtype), "the updated weights"), keep


def calibrated_masks(model: nn.Module, targets: dict[str, nn.Module], data: Iterable,
                     criterion: CalibratedImportance, sparsity: float | None, n_m: tuple[int, int] | None,
                     masks_of) -> dict:
    """Masks (and updated weights, if the criterion makes them) for ``targets``, block by block.
    ``masks_of(module)`` gives a layer's current keep-mask (pruned weights stay pruned). The model
    is not changed here except temporarily: each pruned block's weights are set while the next
    block's inputs are computed, and restored before returning."""
    batches = list(data)
    if not batches:
        raise PangkasError("data is empty: one-shot pruning needs calibration batches")
    for name, module in targets.items():
        if not isinstance(module, LAYERS) or (isinstance(module, nn.Conv2d) and module.groups != 1):
            raise PangkasError(f"importance={criterion.name!r} supports Linear and (ungrouped) Conv2d layers; "
                               f"{name} is {type(module).__name__}: exclude it")
    blocks = blocks_of(model)
    in_blocks = {n for n in targets if any(n.startswith(b + ".") for b in blocks)}
    results: dict = {}
    with evaluating(model):
        outside = {n: m for n, m in targets.items() if n not in in_blocks}
        if outside:
            results.update(_prune_layers(outside, lambda: [call_model(model, b) for b in batches],
                                         criterion, sparsity, n_m, masks_of))
        if in_blocks:
            results.update(_blockwise(model, blocks, {n: targets[n] for n in in_blocks}, batches,
                                      criterion, sparsity, n_m, masks_of))
    return results


@torch.no_grad()
def _blockwise(model, blocks, targets, batches, criterion, sparsity, n_m, masks_of) -> dict:
    captured = first_block_inputs(model, blocks[0], batches)
    results, saved = {}, []
    try:
        for block_name in track(blocks, f"{criterion.name}: pruning block by block"):
            block = model.get_submodule(block_name)
            layers = {n: m for n, m in targets.items() if n.startswith(block_name + ".")}
            block_results = _prune_layers(layers, lambda: read_by(block, list(layers.values()), captured),
                                          criterion, sparsity, n_m, masks_of)
            results.update(block_results)
            for name, (weight, keep) in block_results.items():  # feed the next block pruned outputs
                param = underlying_parameter(targets[name])
                saved.append((param, param.data))  # untouched: .data gets a new tensor below
                param.data = torch.where(keep, weight if weight is not None else param.detach(), 0.0)
            captured = next_inputs(block, captured)
    finally:
        for param, data in reversed(saved):
            param.data = data
    return results
