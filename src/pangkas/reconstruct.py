"""Least-squares reconstruction: the layers that read removed channels re-fit their kept weights.

Removing channels loses what the next layer read from them. For each consumer (a Linear or an
ungrouped Conv2d whose inputs lose channels) with weight ``W`` and inputs ``X`` on calibration
data, the kept columns are re-fitted to give the consumer's original output from the kept inputs
alone::

    min ||X_K W_K'^T - X W^T||^2 + damp * ||W_K' - W_K||^2   ->   W_K' = W_K + W_R G_RK (G_KK + damp I)^-1

with ``G = X^T X`` accumulated over the data (streamed: activations are never kept), a bias
taking the place of a constant input (it absorbs the removed channels' mean, as FLAP's bias
compensation does). Removed channels that carried nothing (``G_RK = 0``) change nothing, so exact
pruning stays exact.

Consumers are fitted in the order the model runs them, each on the inputs the already re-fitted
layers before it produce, with the plan's cut simulated by zeroing what reads removed channels
(``silence.py``). Repeated blocks are run one at a time on captured inputs (``blockwise.py``), so
a large model costs about one forward pass of the data per consumer inside a block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .activations import DAMP, AffineFit, InputStatistics, damped_, recording
from .blockwise import LAYERS, blocks_of, first_block_inputs, next_inputs
from .errors import PangkasError
from .inputs import call_model
from .layer_importance.states import input_tensor, real_tokens
from .modules import evaluating
from .outputs import first_tensor
from .progress import track
from .silence import restore, silence_removed
from .surgery.blocks import LinearStandIn



def consumers(plan) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """The layers whose inputs ``plan`` cuts, with the input channels each keeps."""
    keep = plan.keep()
    found = {}
    for name, module in plan.model.named_modules():
        if not isinstance(module, LAYERS) or (isinstance(module, nn.Conv2d) and module.groups != 1):
            continue
        kept = keep.get(f"{name}.weight", [None, None])[1]
        if kept is not None:
            found[name] = (module, kept)
    return found


@torch.no_grad()
def reconstruct(plan, data, damp: float = DAMP) -> Callable[[], None]:
    """Silence what ``plan`` removes in ``plan.model`` and re-fit the consumers' kept weights on
    ``data`` (see the module docstring). Returns a function that puts every weight back; on an
    error or interrupt they are put back before it propagates."""
    batches = list(data) if data is not None else []
    if not batches:
        raise PangkasError("reconstruct=True needs calibration batches: give data=")
    if not (isinstance(damp, (int, float)) and damp > 0):
        raise PangkasError(f"damp must be a positive number, got {damp!r}")
    model = plan.model
    targets = consumers(plan)
    saved = silence_removed(plan, consumers_only=True)
    try:
        with evaluating(model):
            _fit_all(model, targets, batches, saved, damp)
    except BaseException:
        restore(saved)
        raise
    return lambda: restore(saved)


def _fit_all(model, targets, batches, saved, damp) -> None:
    blocks = blocks_of(model)
    inside = lambda name: any(name.startswith(b + ".") for b in blocks)  # noqa: E731
    order = _call_order(model, targets, batches[0])
    first = next((i for i, n in enumerate(order) if inside(n)), len(order))
    whole_model = lambda: [call_model(model, b) for b in batches]  # noqa: E731
    for name in order[:first]:  # before the blocks
        _fit_on(whole_model, name, targets[name], saved, damp)
    if first < len(order):
        calls = first_block_inputs(model, blocks[0], batches)
        for block_name in track(blocks, "reconstructing block by block"):
            block = model.get_submodule(block_name)
            for name in (n for n in order if n.startswith(block_name + ".")):
                _fit_on(lambda: [block(*a, **k) for a, k in calls], name, targets[name], saved, damp)
            calls = next_inputs(block, calls)
    for name in (n for n in order[first:] if not inside(n)):  # after the blocks
        _fit_on(whole_model, name, targets[name], saved, damp)


def _call_order(model, targets, batch) -> list[str]:
    """``targets`` in the order one forward pass first calls them (those not called are dropped)."""
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name) if name not in order else None)
             for name, (m, _) in targets.items()]
    try:
        call_model(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return order


def _fit_on(run, name: str, target: tuple[nn.Module, torch.Tensor], saved: list, damp) -> None:
    """Gather the layer's input Gram while ``run()`` runs, then re-fit its kept weights (their
    values before any change are added to ``saved``)."""
    module, kept = target
    with recording({name: module}, gram=True, constant=module.bias is not None) as stats:
        run()
    if stats[name].total is None:
        return  # not reached by the data: only silenced
    before = {id(t): old for t, old in saved}
    weight = before.get(id(module.weight))  # silencing saved the dense weight
    for t in (module.weight, module.bias):
        if t is not None and id(t) not in before:
            saved.append((t, t.detach().clone()))
    try:
        _refit(module, stats[name], kept, weight, damp)
    except torch.linalg.LinAlgError as exc:
        raise PangkasError(f"reconstruction of {name} failed ({exc}); try a larger damp or more data") from exc


def _refit(module, stats: InputStatistics, kept: torch.Tensor, weight: torch.Tensor | None, damp) -> None:
    """Set ``module``'s kept input weights (and bias) to the least-squares fit; the removed stay 0."""
    w = (module.weight if weight is None else weight).detach().double()
    w = w.reshape(w.shape[0], -1)
    per_channel = w.shape[1] // module.weight.shape[1]  # kernel positions of a conv
    columns = (kept[:, None] * per_channel + torch.arange(per_channel)).flatten()
    if module.bias is not None:  # the constant input, last in the Gram, is the bias's column
        w = torch.cat([w, module.bias.detach().double()[:, None]], 1)
        columns = torch.cat([columns, torch.tensor([w.shape[1] - 1])])
    removed = torch.ones(w.shape[1], dtype=torch.bool)
    removed[columns] = False
    g = stats.gram.double()
    g_kk = damped_(g[columns][:, columns], damp)
    correction = torch.cholesky_solve(g[columns][:, removed] @ w[:, removed].T, torch.linalg.cholesky(g_kk)).T
    fitted = (w[:, columns] + correction).to(module.weight.dtype)
    if module.bias is not None:
        module.bias.copy_(fitted[:, -1])
        fitted = fitted[:, :-1]
    flat = module.weight.detach().reshape(module.weight.shape[0], -1).clone()
    flat[:, columns[:fitted.shape[1]]] = fitted
    module.weight.copy_(flat.view(module.weight.shape))


# -- removed blocks: a fitted linear map in their place (replace="linear") ---------------------

@dataclass
class LinearReplacement:
    """A fitted map ``t`` for ``proj``'s output (see :func:`fit_linear_replacement`)."""

    proj: nn.Linear
    t: torch.Tensor

    @torch.no_grad()
    def fold(self) -> Callable[[], None]:
        """Fold ``t`` into the projection (``M -> M t``); returns what restores it."""
        proj = self.proj
        saved = [(p, p.detach().clone()) for p in (proj.weight, proj.bias) if p is not None]
        proj.weight.copy_((self.t.T @ proj.weight.double()).to(proj.weight.dtype))
        if proj.bias is not None:
            proj.bias.copy_((proj.bias.double() @ self.t).to(proj.bias.dtype))
        return lambda: restore(saved)


@torch.no_grad()
def fit_linear_replacement(model: nn.Module, before: str, last: str, batches: list,
                           damp: float = DAMP) -> LinearReplacement:
    """A linear map standing in for the blocks after ``before`` up to ``last`` (about to be
    removed), for ``before``'s output projection (its last Linear writing the hidden width),
    ReplaceMe-style: with ``M`` the projection's output and ``Y`` the rest of ``before``'s output
    (``before`` adds ``M`` to its residual stream), ``T`` minimises ``||Y + M T - L||^2`` for ``L``
    the output of ``last``, on ``batches``. Refuses a block whose output is not ``Y + M`` (checked
    by folding ``T`` in and out again)."""
    block, end = model.get_submodule(before), model.get_submodule(last)
    proj = _output_projection(model, block, batches[0])
    seen: dict[str, torch.Tensor] = {}
    hooks = [proj.register_forward_hook(lambda m, a, out: seen.__setitem__("m", out)),
             block.register_forward_hook(lambda m, a, out: seen.__setitem__("z", first_tensor(out))),
             end.register_forward_hook(lambda m, a, out: seen.__setitem__("l", first_tensor(out)))]
    width = proj.out_features
    mtm = torch.zeros(width, width, dtype=torch.float64)
    mtr = torch.zeros(width, width, dtype=torch.float64)
    try:
        with evaluating(model):
            for batch in track(batches, f"fitting a linear map for the blocks after {before}"):
                call_model(model, batch)
                m = seen["m"].reshape(-1, width).double()
                target = (seen["l"] - seen["z"]).reshape(-1, width).double() + m  # L - Y
                mtm += m.T @ m
                mtr += m.T @ target
            probe = {k: v.clone() for k, v in seen.items()}
    finally:
        for h in hooks:
            h.remove()
    damped_(mtm, damp)
    replacement = LinearReplacement(proj, torch.cholesky_solve(mtr, torch.linalg.cholesky(mtm)))
    unfold = replacement.fold()
    try:
        _check_residual(model, block, batches[-1], probe, replacement.t, before)
    finally:
        unfold()
    return replacement


def _output_projection(model: nn.Module, block: nn.Module, batch) -> nn.Linear:
    """The last Linear ``block`` calls whose width is the block's output width."""
    called: list[nn.Linear] = []
    out: dict = {}
    hooks = [m.register_forward_hook(lambda m, a, o: called.append(m)) for m in block.modules()
             if isinstance(m, nn.Linear)]
    hooks.append(block.register_forward_hook(lambda m, a, o: out.__setitem__("y", first_tensor(o))))
    try:
        with evaluating(model):
            call_model(model, batch)
    finally:
        for h in hooks:
            h.remove()
    width = out["y"].shape[-1] if "y" in out else None
    found = [m for m in called if m.out_features == width]
    if not found:
        raise PangkasError("replace='linear' needs the block before the removed ones to end with a Linear "
                           "writing its output width (a transformer MLP's down projection)")
    return found[-1]


def _check_residual(model, block, batch, probe, t, before) -> None:
    """Refuse when ``block``'s output did not change by ``M (T - I)`` (relative to that change):
    it does not add the projection's output to its residual stream (post-norm blocks)."""
    seen: dict = {}
    hook = block.register_forward_hook(lambda m, a, out: seen.__setitem__("z", first_tensor(out)))
    try:
        with evaluating(model):
            call_model(model, batch)
    finally:
        hook.remove()
    m = probe["m"].double()
    change = (m.reshape(-1, m.shape[-1]) @ t).reshape(m.shape) - m
    error = float((seen["z"].double() - probe["z"].double() - change).norm() / change.norm().clamp_min(1e-12))
    if error > 1e-3:
        raise PangkasError(f"replace='linear': {before} does not add its output projection to a residual "
                           f"stream (post-norm?), so a map folded into it cannot stand in for the removed "
                           f"blocks (mismatch {error:.2g}); remove them without replace=")


# -- removed blocks where nothing can be folded: a stand-in module (replace="linear") ----------

@torch.no_grad()
def fit_stand_in(model: nn.Module, first: str, last: str, batches: list, *, tuple_length: int = 0,
                 damp: float = DAMP) -> LinearStandIn:
    """A ``LinearStandIn`` for the consecutive blocks ``first`` .. ``last`` (about to be removed):
    ridge least squares on ``batches`` from what ``first`` reads to what ``last`` returns (the
    input of the block after the run, which is what the rest of the model sees), padding tokens
    left out. The model is only run, never changed.

    Why this form, measured on the pretrained MiniLM (post-norm, 2 of 6 layers replaced, mean
    cosine of sentence embeddings over the 15 pairs, calibration 100 sentences): fitting the
    run's output directly beat fitting the last layer's LayerNorm input and renormalising
    (best pair 0.899 against 0.891; the LayerNorm fit was far worse for pairs starting at 0);
    ``x + W x + b`` with the ridge pulling towards identity beat plain ``W x + b`` by 0.002-0.005;
    damp 0.01 beat 0.001 (0.899 against 0.892)."""
    start, end = model.get_submodule(first), model.get_submodule(last)
    seen: dict[str, torch.Tensor] = {}
    hooks = [start.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("x", input_tensor(a, k)),
                                             with_kwargs=True),
             end.register_forward_hook(lambda m, a, out: seen.__setitem__("y", first_tensor(out)))]
    fit = AffineFit()
    try:
        with evaluating(model):
            for batch in track(batches, f"fitting a linear stand-in for {first}..{last}"):
                seen.clear()
                call_model(model, batch)
                if "x" in seen and "y" in seen:
                    fit.add(seen["x"], seen["y"], real_tokens(batch, seen["x"]))
    finally:
        for h in hooks:
            h.remove()
    if fit.gram is None:
        raise PangkasError(f"replace='linear': the data never reaches {first}, so no stand-in can be fitted")
    try:
        solution = fit.solve(damp)
    except torch.linalg.LinAlgError as exc:
        raise PangkasError(f"replace='linear': the stand-in for {first}..{last} cannot be fitted ({exc}); "
                           "try more calibration data") from exc
    reference = next(start.parameters(), seen["x"])
    stand_in = LinearStandIn(solution.shape[1], tuple_length, dtype=reference.dtype, device=reference.device)
    stand_in.linear.weight.copy_(solution[:-1].T)
    stand_in.linear.bias.copy_(solution[-1])
    return stand_in
