"""One-shot pruning from calibration data: Wanda and SparseGPT, one block at a time.

The model is cut into its repeated blocks (a ``ModuleList`` of layers, or the blocks layer
pruning finds); the first block's inputs are captured from ``data``, each block is pruned on the
inputs it really receives, and its pruned outputs become the next block's inputs, so errors do
not compound unseen and memory holds one block's activations. Layers outside the blocks (stems,
heads) are pruned on inputs captured in one pass of the whole model.

- Wanda (Sun et al. 2023): score ``|W_ij| * ||X_j||``, each output row loses the same share.
- SparseGPT (Frantar & Alistarh 2023): row-wise OBS with the inverse Hessian of ``X^T X``; the
  mask is chosen in column blocks and the kept weights are updated to absorb the error.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import PangkasError
from ..inputs import call_model
from ..modules import evaluating
from ..progress import track
from . import sparsity as rules
from .masks import underlying_parameter

LAYERS = (nn.Linear, nn.Conv2d)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the first block's inputs are captured."""


def _as_matrix(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of the matrix its weight multiplies: tokens for Linear, im2col
    patches for Conv2d."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).float()
    patches = nn.functional.unfold(x.float(), module.kernel_size, module.dilation, module.padding, module.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


class _Stats:
    """Running ``X^T X`` (SparseGPT) or per-feature ``sum x^2`` (Wanda) of a layer's inputs."""

    def __init__(self, method: str):
        self.method, self.total, self.count = method, None, 0

    def add(self, module: nn.Module, x: torch.Tensor) -> None:
        rows = _as_matrix(module, x)
        part = rows.T @ rows if self.method == "sparsegpt" else rows.pow(2).sum(0)
        self.total = part if self.total is None else self.total + part
        self.count += rows.shape[0]


def _weight2d(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().float().reshape(module.weight.shape[0], -1)


def _channels_last(module: nn.Module) -> torch.Tensor:
    """Column order putting input channels innermost (N:M groups run along input channels, as in
    magnitude N:M); identity for Linear."""
    if isinstance(module, nn.Linear):
        return torch.arange(module.weight.shape[1])
    c, kh, kw = module.weight.shape[1:]
    return torch.arange(c * kh * kw).reshape(c, kh, kw).permute(1, 2, 0).flatten()


def _finite(scores: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(scores).all():
        raise PangkasError(f"{what} are not finite (NaN/inf); check the calibration data= "
                           "(NaN/inf inputs, or activations that overflow)")
    return scores


def _row_masks(scores: torch.Tensor, old: torch.Tensor | None, sparsity: float | None,
               n_m: tuple[int, int] | None) -> torch.Tensor:
    """Keep-mask of a (rows, inputs) score matrix: N:M along the inputs, or the same share per row."""
    if n_m is not None:
        return rules.extend_n_m(scores, old, *n_m, dim=1)
    return torch.stack([rules.extend_mask(row, None if old is None else old[i], rules.prune_count(row.numel(), sparsity))
                        for i, row in enumerate(scores)])


def wanda_mask(weight: torch.Tensor, feature_sq: torch.Tensor, old: torch.Tensor | None,
               sparsity: float | None, n_m: tuple[int, int] | None) -> torch.Tensor:
    scores = _finite(weight.abs() * feature_sq.sqrt()[None, :], "Wanda scores (|w| x input norm)")
    return _row_masks(scores, old, sparsity, n_m)


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, old: torch.Tensor | None,
              sparsity: float | None, n_m: tuple[int, int] | None, block: int = 128,
              damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight, keep mask) of one layer's (rows, inputs) weight, SparseGPT's algorithm."""
    w = weight.clone()
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(len(h))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    keep = torch.ones_like(w, dtype=torch.bool)
    columns = w.shape[1]
    for start in range(0, columns, block):
        end = min(start + block, columns)
        w1, hinv1 = w[:, start:end].clone(), hinv[start:end, start:end]
        err = torch.zeros_like(w1)
        if n_m is None:
            score = _finite(w1.pow(2) / torch.diag(hinv1).pow(2)[None, :], "SparseGPT scores")
            prune = ~_row_masks(score, None if old is None else old[:, start:end], sparsity, None)
        else:
            prune = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(end - start):
            column, d = w1[:, i], hinv1[i, i]
            if n_m is not None and i % n_m[1] == 0:
                span = slice(i, min(i + n_m[1], end - start))
                score = _finite(w1[:, span].pow(2) / torch.diag(hinv1)[span].pow(2)[None, :], "SparseGPT scores")
                prune[:, span] = ~_row_masks(score, None if old is None else old[:, start:end][:, span], None, n_m)
            q = column.clone()
            q[prune[:, i]] = 0
            e = (column - q) / d
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            w1[:, i] = q
            err[:, i] = e
        w[:, start:end] = w1
        keep[:, start:end] = ~prune
        w[:, end:] -= err @ hinv[start:end, end:]
    return w, keep


def blocks_of(model: nn.Module) -> list[str]:
    """The model's repeated blocks in order: the longest ModuleList/Sequential of same-class
    modules that contain prunable layers (HF layers, ViT encoder layers, ResNet stages' blocks)."""
    best: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 1:
            children = list(module.named_children())
            if len({type(m) for _, m in children}) == 1 and any(
                    isinstance(m, LAYERS) for _, c in children for m in c.modules()):
                if len(children) > len(best):
                    best = [f"{name}.{c}" if name else c for c, _ in children]
    return best


@torch.no_grad()
def _prune_layers(layers: dict[str, nn.Module], run, method, sparsity, n_m, masks_of) -> dict:
    """Collect input statistics of ``layers`` while ``run()`` runs, then compute their masks
    (and, for SparseGPT, new weights). Returns {name: (weight or None, keep mask)}."""
    stats = {name: _Stats(method) for name in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=name: stats[n].add(mod, args[0]))
             for name, m in layers.items()]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    results = {}
    for name, module in layers.items():
        if stats[name].total is None:
            continue  # not reached by the calibration data: keep as is
        try:
            results[name] = _layer_result(module, stats[name], method, sparsity, n_m, masks_of)
        except (PangkasError, torch.linalg.LinAlgError) as exc:
            raise PangkasError(f"method={method!r} cannot prune {name}: {exc}") from exc
    return results


def _layer_result(module, stats: _Stats, method, sparsity, n_m, masks_of):
    """(SparseGPT's new weight or None, keep mask) of one layer from its input statistics."""
    total = _finite(stats.total, "the statistics of its inputs")
    perm = _channels_last(module)
    back = torch.argsort(perm)
    w = _weight2d(module)[:, perm]
    old = masks_of(module)
    old = None if old is None else old.reshape(w.shape[0], -1)[:, perm]
    shape = module.weight.shape
    if method == "wanda":
        keep = wanda_mask(w, total[perm], old, sparsity, n_m)
        return None, keep[:, back].reshape(shape)
    hessian = (total / stats.count)[perm][:, perm]
    new, keep = sparsegpt(w, hessian, old, sparsity, n_m)
    new = _finite(new[:, back].reshape(shape).to(module.weight.dtype), "SparseGPT's updated weights")
    return new, keep[:, back].reshape(shape)


def calibrated_masks(model: nn.Module, targets: dict[str, nn.Module], data: Iterable, method: str,
                     sparsity: float | None, n_m: tuple[int, int] | None, masks_of) -> dict:
    """Masks (and SparseGPT weights) for ``targets``, block by block. ``masks_of(module)`` gives a
    layer's current keep-mask (pruned weights stay pruned). The model is not changed here except
    temporarily: each pruned block's weights are set while the next block's inputs are computed,
    and restored before returning."""
    batches = list(data)
    if not batches:
        raise PangkasError("data is empty: one-shot pruning needs calibration batches")
    for name, module in targets.items():
        if not isinstance(module, LAYERS) or (isinstance(module, nn.Conv2d) and module.groups != 1):
            raise PangkasError(f"method={method!r} supports Linear and (ungrouped) Conv2d layers; {name} is "
                               f"{type(module).__name__}: exclude it")
    blocks = blocks_of(model)
    in_blocks = {n for n in targets if any(n.startswith(b + ".") for b in blocks)}
    results: dict = {}
    with evaluating(model):
        outside = {n: m for n, m in targets.items() if n not in in_blocks}
        if outside:
            results.update(_prune_layers(outside, lambda: [call_model(model, b) for b in batches],
                                         method, sparsity, n_m, masks_of))
        if in_blocks:
            results.update(_blockwise(model, blocks, {n: targets[n] for n in in_blocks}, batches,
                                      method, sparsity, n_m, masks_of))
    return results


@torch.no_grad()
def _blockwise(model, blocks, targets, batches, method, sparsity, n_m, masks_of) -> dict:
    first = model.get_submodule(blocks[0])
    captured: list[tuple[tuple, dict]] = []

    def grab(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            try:
                call_model(model, batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise PangkasError(f"could not capture the inputs of {blocks[0]} for every batch")
    results, saved = {}, []
    try:
        for block_name in track(blocks, f"{method}: pruning block by block"):
            block = model.get_submodule(block_name)
            layers = {n: m for n, m in targets.items() if n.startswith(block_name + ".")}
            block_results = _prune_layers(layers, lambda: [block(*a, **k) for a, k in captured],
                                          method, sparsity, n_m, masks_of)
            results.update(block_results)
            for name, (weight, keep) in block_results.items():  # feed the next block pruned outputs
                param = underlying_parameter(targets[name])
                saved.append((param, param.detach().clone()))
                param.data = torch.where(keep, weight if weight is not None else param.detach(), 0.0)
            captured = [_next_inputs(block(*a, **k), a, k) for a, k in captured]
    finally:
        for param, data in reversed(saved):
            param.data = data
    return results


def _next_inputs(output, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The next block's call: this block's hidden-state output in place of its input."""
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
