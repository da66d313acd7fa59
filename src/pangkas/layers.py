"""Layer pruning: find the blocks a model can lose, score them on data, delete them.

Candidates come from running the model once: a module whose output has its input's shape and
whose forward adds its own input back (``x + f(x)``: ResNet, MobileNet, ConvNeXt, ViT, Swin and
Hugging Face pre-norm layers); any entry of a ``ModuleList`` of same-class layers (Hugging Face
encoder/decoder layers, post-norm ones too); any ``Sequential`` member with parameters whose
output has its input's shape. Removing one deletes it from its container, or puts a ``Skip`` in
its place; with ``replace="linear"`` a fitted linear map stands in for each run of removed blocks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .deprecation import renamed
from .errors import OperationFailed, PangkasError
from .inputs import call_model
from .layer_importance import Candidate, LayerImportance, checked, input_tensor, nested
from .layer_importance import angular, block_influence, greedy, magnitude, runs  # noqa: F401 (their old home)
from .layer_importance import resolve as resolve_importance
from .macs import op_flops
from .markers import EDITS
from .measure import count_macs
from .modules import ModuleFilter, Selector, evaluating
from .outputs import first_tensor, tensors
from .reconstruct import fit_linear_replacement, fit_stand_in
from .repeats import is_stack
from .reports import Report
from .surgery.blocks import remove_blocks
from .tables import human_count, render_table


@dataclass
class _Frame:
    x: torch.Tensor | None
    skip: bool = False
    macs: int = 0


class _Watch(TorchDispatchMode):
    """Notices ``add`` ops that take a running module's own input, and counts MACs per module."""

    def __init__(self, frames: list[_Frame]):
        super().__init__()
        self.frames = frames

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket in (torch.ops.aten.add, torch.ops.aten.add_) and len(args) > 1:
            # x + f(x): one operand is a running module's own input and the other is computed
            # (x + pos_embedding adds a parameter: not a residual branch). The innermost module
            # taking x owns the skip, not the containers it was passed through.
            for frame in reversed(self.frames):
                if frame.x is not None and any(a is frame.x for a in args[:2]):
                    other = args[1] if args[0] is frame.x else args[0]
                    frame.skip = frame.skip or not isinstance(other, nn.Parameter)
                    break
        macs = op_flops(func.overloadpacket, args, kwargs, out) // 2
        for frame in self.frames:
            frame.macs += macs
        return out


def layer_candidates(model: nn.Module, example_inputs) -> list[Candidate]:
    """The blocks of ``model`` that layer pruning may remove, in execution order."""
    names = {id(m): n for n, m in model.named_modules()}
    frames: list[_Frame] = []
    seen: dict[str, dict] = {}

    def enter(module, args, kwargs):
        frames.append(_Frame(input_tensor(args, kwargs)))

    def leave(module, args, kwargs, output):
        frame = frames.pop()
        name = names.get(id(module))
        y = first_tensor(output)
        if name and frame.x is not None and y is not None and name not in seen:
            seen[name] = {"same": tuple(frame.x.shape) == tuple(y.shape), "skip": frame.skip,
                          "shape": tuple(y.shape), "macs": frame.macs,
                          "tuple": len(output) if isinstance(output, tuple) else 0}

    handles = [m.register_forward_pre_hook(enter, with_kwargs=True) for m in model.modules()]
    handles += [m.register_forward_hook(leave, with_kwargs=True, always_call=True) for m in model.modules()]
    try:
        with evaluating(model), torch.no_grad(), _Watch(frames):
            call_model(model, example_inputs)
    except Exception as exc:
        raise PangkasError(f"the model does not run on the example inputs: {type(exc).__name__}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
    return [c for name, info in seen.items() if (c := _qualify(model, name, info)) is not None]


def _qualify(model: nn.Module, name: str, info: dict) -> Candidate | None:
    if not info["same"]:
        return None
    module = model.get_submodule(name)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    in_container = isinstance(parent, (nn.ModuleList, nn.Sequential)) and child.isdigit()
    params = sum(p.numel() for p in module.parameters())
    kinds = []
    if info["skip"]:
        kinds.append("residual")
    if isinstance(parent, nn.ModuleList) and is_stack(parent):
        kinds.append("layer list")
    if (type(parent) is nn.Sequential and in_container and not info["skip"]
            and any(isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) for m in module.modules())):
        kinds.append("sequential")  # a weight layer or block in a plain Sequential (not Conv-BN-act units)
    if not kinds:
        return None
    return Candidate(name, tuple(kinds), parent_name if in_container else None,
                     int(child) if in_container else None, info["shape"], params, info["macs"],
                     info["tuple"])


# -- planning and removal --------------------------------------------------------------------

@dataclass
class LayerPlan:
    """Which blocks ``prune_layers`` would remove, and why; nothing changes until ``apply()``."""

    model: nn.Module
    example_inputs: object
    candidates: list[Candidate]
    importance: str
    scores: dict
    chosen: list[str]
    macs_before: int
    params_before: int
    applied: bool = False
    replace: str | None = None
    data: list | None = None  # calibration batches (replace="linear" fits on them)
    stand_ins: list[str] | None = None  # the runs (by first block) a LinearStandIn replaces; known after apply()

    @property
    def macs_after(self) -> int:
        removed = sum(c.macs for c in self.candidates if c.name in self.chosen)
        return self.macs_before - removed + sum(self._stand_in_cost(n)[1] for n in self._stand_in_names())

    @property
    def params_after(self) -> int:
        removed = sum(c.params for c in self.candidates if c.name in self.chosen)
        return self.params_before - removed + sum(self._stand_in_cost(n)[0] for n in self._stand_in_names())

    def _stand_in_names(self) -> list[str]:
        """The runs stand-ins replace: as applied, or as expected before (where no block before
        the run adds to a residual stream a map could be folded into)."""
        if self.stand_ins is not None:
            return self.stand_ins
        if self.replace is None:
            return []
        where = {c.name: c for c in self.candidates}
        return [run[0] for run in self.runs() if self._before(run) is None or "residual" not in where[run[0]].kinds]

    def _stand_in_cost(self, name: str) -> tuple[int, int]:
        """(params, MACs on the example inputs) of a LinearStandIn where block ``name`` was."""
        shape = next(c.shape for c in self.candidates if c.name == name)
        width, rows = shape[-1], math.prod(shape[:-1])
        return width * width + width, rows * width * width

    def __str__(self) -> str:
        rows = []
        for c in self.candidates:
            score = self.scores.get(c.name)
            rows.append((c.name, "+".join(c.kinds), "x".join(map(str, c.shape)), human_count(c.params),
                         human_count(c.macs), "" if score is None else f"{score:.4g}",
                         "remove" if c.name in self.chosen else ""))
        text = render_table(f"layer plan: importance={self.importance}",
                            ("block", "kind", "hidden shape", "params", "MACs", "score", ""), rows)
        return text + (f"\nremoves {len(self.chosen)} of {len(self.candidates)} blocks: params "
                       f"{human_count(self.params_before)} -> {human_count(self.params_after)}, MACs "
                       f"{human_count(self.macs_before)} -> {human_count(self.macs_after)}")

    def apply(self) -> "LayerReport":
        """Delete the chosen blocks; the model must still run with unchanged output shapes, or it
        is restored and ``OperationFailed`` raised."""
        if self.applied:
            raise PangkasError("this plan was already applied; make a new plan for further pruning")
        before = _output_shapes(self.model, self.example_inputs)
        unfold, stand_ins = self._replacements()
        tuples = {c.name: c.tuple_length for c in self.candidates}
        try:
            undo = remove_blocks(self.model, self.chosen, tuples, stand_ins)
        except BaseException:
            unfold()
            raise
        try:
            after = _output_shapes(self.model, self.example_inputs)
        except PangkasError as exc:
            undo.restore()
            unfold()
            raise OperationFailed(f"the model no longer runs without {self.chosen}; it is unchanged. {exc}") from exc
        except BaseException:  # an interrupt: put the blocks back and let it through
            undo.restore()
            unfold()
            raise
        if after != before:
            undo.restore()
            unfold()
            raise OperationFailed(f"removing {self.chosen} changes the output shapes {before} -> {after}; "
                               "the model is unchanged")
        edit = {"remove_blocks": self.chosen, "tuple_lengths": {n: tuples[n] for n in self.chosen}}
        if stand_ins:  # load recreates them (their weights are in the file) in place of the blocks
            edit["stand_ins"] = {n: {"width": m.linear.in_features} for n, m in stand_ins.items()}
        setattr(self.model, EDITS, [*getattr(self.model, EDITS, []), edit])
        self.stand_ins = list(stand_ins)
        self.applied = True
        return LayerReport(self)

    def runs(self) -> list[list[str]]:
        """The chosen blocks as runs of consecutive blocks of one layer list, in order (a block
        outside a container is a run of its own)."""
        where = {c.name: c for c in self.candidates}
        out: list[list[str]] = []
        for name in sorted(self.chosen, key=lambda n: (where[n].container or n, where[n].index or 0)):
            c, last = where[name], where[out[-1][-1]] if out else None
            if last and c.container is not None and last.container == c.container and last.index == c.index - 1:
                out[-1].append(name)
            else:
                out.append([name])
        return out

    def _before(self, run: list[str]) -> str | None:
        """The block before ``run`` in its layer list (None: the run is first, or in no list)."""
        c = next(c for c in self.candidates if c.name == run[0])
        return f"{c.container}.{c.index - 1}" if c.container is not None and c.index else None

    def check_replaceable(self) -> None:
        """Refuse now the runs ``replace="linear"`` could neither fold nor stand in for."""
        for run in self.runs():
            if self._before(run) is None:
                c = next(c for c in self.candidates if c.name == run[0])
                where = f"the first of {c.container}" if c.container else "in no layer list"
                self._check_stand_in(run, f"replace='linear' folds a map into the block before the removed "
                                          f"ones; {run[0]} is {where}")

    def _check_stand_in(self, run: list[str], why: str) -> None:
        """PangkasError (saying ``why`` the map cannot be folded) if a LinearStandIn cannot take
        ``run``'s place."""
        shape = next(c.shape for c in self.candidates if c.name == run[0])
        if len(shape) > 3:
            raise PangkasError(f"{why}; nor can a linear stand-in, which maps hidden states with features "
                               f"last (tokens), take the place of {run}: they pass {len(shape)}-d feature maps")
        writes_cache = any(isinstance(getattr(m, "layer_idx", None), int) and getattr(m, "is_causal", False) is True
                           for name in run for m in self.model.get_submodule(name).modules())
        if writes_cache:
            raise PangkasError(f"{why}; nor can a linear stand-in take the place of {run}: they write a causal "
                               "decoder's KV cache, whose entries would then be missing; remove them without "
                               "replace=, or choose others")

    def _replacements(self) -> tuple[Callable[[], None], dict[str, nn.Module]]:
        """For ``replace="linear"``, fit each run's map on the dense model: folded into the block
        before where it adds to a residual stream, else a ``LinearStandIn``. Folds every foldable
        map in; returns what undoes the folds, and the stand-ins by the first block of their run."""
        if self.replace is None:
            return (lambda: None), {}
        tuples = {c.name: c.tuple_length for c in self.candidates}
        maps, stand_ins = [], {}
        for run in self.runs():
            before = self._before(run)
            try:
                if before is None:
                    raise PangkasError("no block before the run")  # checked by check_replaceable
                maps.append(fit_linear_replacement(self.model, before, run[-1], self.data))
            except PangkasError as refused:  # post-norm: the block before ends in a LayerNorm
                self._check_stand_in(run, str(refused))
                stand_ins[run[0]] = fit_stand_in(self.model, run[0], run[-1], self.data,
                                                 tuple_length=tuples[run[0]])
        folded: list[Callable[[], None]] = []

        def unfold() -> None:
            for undo in reversed(folded):
                undo()

        try:
            for replacement in maps:
                folded.append(replacement.fold())
        except BaseException:
            unfold()
            raise
        return unfold, stand_ins


@dataclass
class LayerReport(Report):
    """What ``LayerPlan.apply`` / ``prune_layers`` removed."""

    plan: LayerPlan
    kind = "layers"

    @property
    def chosen(self) -> list[str]:
        return self.plan.chosen

    params_before = property(lambda self: self.plan.params_before)
    params_after = property(lambda self: self.plan.params_after)
    macs_before = property(lambda self: self.plan.macs_before)
    macs_after = property(lambda self: self.plan.macs_after)

    def details(self) -> dict:
        return {"importance": self.plan.importance, "removed": list(self.chosen),
                "stand_ins": list(self.plan.stand_ins or []),
                "scores": {str(k): float(v) for k, v in self.plan.scores.items()}}

    def __str__(self) -> str:
        return str(self.plan).replace("layer plan", "layers removed", 1)


def _output_shapes(model, example_inputs) -> list[tuple[int, ...]]:
    try:
        with evaluating(model), torch.no_grad():
            output = call_model(model, example_inputs)
    except Exception as exc:
        raise PangkasError(f"{type(exc).__name__}: {exc}") from exc
    return [tuple(t.shape) for t in tensors(output)]


def _count(n, ratio, available: int) -> int:
    if ratio is not None:
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio < 1:
            raise PangkasError(f"ratio must be in (0, 1), got {ratio!r}")
        n = max(1, round(ratio * available))
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise PangkasError(f"n must be a positive integer, got {n!r}")
    if n > available:
        raise PangkasError(f"n={n} but the model has only {available} removable blocks; "
                           "see pangkas.layer_candidates")
    return n


def _one_amount(n, ratio, target_macs, target_params) -> None:
    given = [k for k, v in {"n": n, "ratio": ratio, "target_macs": target_macs, "target_params": target_params}.items()
             if v is not None]
    if len(given) != 1:
        raise PangkasError("give exactly one of n= (blocks to remove), ratio= (fraction of candidates), "
                           f"target_macs= or target_params= (fraction of the model's to keep); got {given or 'none'}")
    for name, value in (("target_macs", target_macs), ("target_params", target_params)):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1):
            raise PangkasError(f"{name} must be in (0, 1) (the fraction of the dense model's to keep), got {value!r}")


def _granular(found: list[Candidate], granularity: str) -> list[Candidate]:
    """Whole layers where the model has a layer list (``"layers"``), or every candidate (``"any"``:
    sublayers such as attention or MLP blocks too)."""
    if granularity not in ("layers", "any"):
        raise PangkasError(f"granularity must be 'layers' (whole layers of a layer list) or 'any' (sublayers "
                           f"too), got {granularity!r}")
    layers = [c for c in found if "layer list" in c.kinds]
    return layers if granularity == "layers" and layers else found


def _within_budget(scores: dict, found: list[Candidate], cost: str, target: float, total: int) -> list[str]:
    """The lowest-scoring blocks per unit of ``cost`` ("macs" or "params"), taken until what stays
    is at most ``target`` of ``total`` (scores of the blocks left are not re-measured)."""
    spend = {c.name: getattr(c, cost) for c in found}
    shift = max(0.0, -min(scores.values()))  # scores are damage: lower goes first; keep them >= 0
    order = sorted((c.name for c in found if c.name in scores and spend[c.name] > 0),
                   key=lambda n: (scores[n] + shift) / spend[n])
    chosen, left = [], total
    for name in order:
        if left <= target * total:
            break
        if any(nested(name, other) or nested(other, name) for other in chosen):
            continue  # a sublayer of a block already going (granularity="any")
        chosen.append(name)
        left -= spend[name]
    if left > target * total:
        raise PangkasError(f"removing every candidate block leaves {left / total:.3g} of the model's {cost}; "
                           f"the target {target} cannot be met by layer pruning")
    return chosen


def _batches(data) -> list:
    if data is None:
        return []
    if isinstance(data, (torch.Tensor, dict)):
        raise PangkasError("data must be an iterable of batches (e.g. a list of tensors or a DataLoader), "
                           "not a single batch: wrap it in a list")
    batches = list(data)
    return batches


@renamed(criterion="importance")
def plan_layers(
    model: nn.Module,
    data: Iterable,
    *,
    n: int | None = None,
    ratio: float | None = None,
    importance: str | LayerImportance | Callable | None = None,
    include: Selector = None,
    exclude: Selector = None,
    loss_fn: Callable | None = None,
    metric_fn: Callable | None = None,
    candidates: list[str] | None = None,
    granularity: str = "layers",
    target_macs: float | None = None,
    target_params: float | None = None,
    replace: str | None = None,
) -> LayerPlan:
    """Choose ``n`` blocks (or ``ratio`` of the candidates) to remove, or as many as it takes to
    keep at most ``target_macs`` / ``target_params`` (fractions of the model's) - then the lowest
    scores per MAC (per parameter) go first. ``data`` is an iterable of batches the model accepts
    (its first batch finds the candidates; every batch scores them).

    ``granularity``: ``"layers"`` (default): where the model has a layer list (Hugging Face
    encoder/decoder layers, a ViT's blocks), only whole layers are candidates, so ``n`` counts
    layers; ``"any"``: their attention/MLP sublayers and other residual blocks too.

    ``replace="linear"``: when applied, each run of removed consecutive layers is replaced by a
    linear map fitted on ``data`` (least squares, from what the run received to what it gave) and
    folded into the output projection of the layer before it (pre-norm transformers: the MLP's
    down projection), so the model keeps its architecture (ReplaceMe, LLM-Streamline). Where it
    cannot be folded (post-norm layers such as BERT's end in a LayerNorm; the first layer has
    none before it), a ``LinearStandIn`` module (``x + W x + b``, fitted to the run's output)
    takes the run's place; ``pangkas.save`` / ``pangkas.load`` keep it, ``save_pretrained`` cannot.

    ``importance``: ``"block_influence"`` (the default: 1 - cos(in, out), lowest goes; with
    ``replace="linear"`` on blocks that are not residual, i.e. that get stand-ins, the default is
    ``"linear_fit"``: the share of a block's output no fitted linear map explains), ``"angular"`` (the
    contiguous run of ``n`` blocks whose ends are closest), ``"loss"`` (``loss_fn(output, batch)``
    rises least when the block alone is skipped; greedy, re-scored after each removal),
    ``"metric"`` (same with ``metric_fn``, higher is better), ``"magnitude"`` (mean |w|, a
    baseline), any name given to ``pangkas.layer_importance.register``, a
    ``pangkas.layer_importance.LayerImportance`` object, or ``fn(model, candidates, data) ->
    {block name: score}`` (the lowest go).

    ``include`` / ``exclude`` (module-name globs or types, as everywhere) restrict the candidate
    blocks: a type selects exactly its instances (``include=BertLayer``), a glob a block and what
    is inside it. ``candidates`` (deprecated: use ``include``) lists exact block names.
    """
    if importance is not None:
        criterion = resolve_importance(importance, loss_fn, metric_fn)  # bad names are refused before any work
    batches = _batches(data)
    if not batches:
        raise PangkasError("data is empty: layer pruning needs at least one batch to find and score blocks")
    _one_amount(n, ratio, target_macs, target_params)
    if replace not in (None, "linear"):
        raise PangkasError(f"replace must be None or 'linear', got {replace!r}")
    found = _granular(_selected(model, layer_candidates(model, batches[0]), include, exclude, candidates), granularity)
    if importance is None:
        criterion = resolve_importance(_default_importance(found, replace), loss_fn, metric_fn)
    params, macs = sum(p.numel() for p in model.parameters()), count_macs(model, batches[0])
    if target_macs is None and target_params is None:
        scores, chosen = _choose(model, found, batches, criterion, _count(n, ratio, len(found)), loss_fn, metric_fn)
    else:
        scores, _ = _choose(model, found, batches, criterion, 1, loss_fn, metric_fn)
        cost, target, total = ("macs", target_macs, macs) if target_macs is not None else ("params", target_params, params)
        chosen = _within_budget(scores, found, cost, target, total)
    plan = LayerPlan(model, batches[0], found, criterion.name, scores, chosen, macs, params, replace=replace,
                     data=batches if replace else None)
    if replace:
        plan.check_replaceable()
    return plan


def _default_importance(found: list[Candidate], replace: str | None) -> str:
    """Block influence, unless the removed blocks will be stood in for by fitted maps (post-norm
    layers with ``replace="linear"``): then how well a map can stand in for each block
    (``"linear_fit"``; on MiniLM it picks the best of the 15 pairs, block influence a pair 0.03
    worse). Residual blocks keep block influence, whose maps are folded into the block before."""
    stood_in = replace == "linear" and found and not any("residual" in c.kinds for c in found)
    return "linear_fit" if stood_in else "block_influence"


def _selected(model, found: list[Candidate], include: Selector, exclude: Selector,
              candidates: list[str] | None) -> list[Candidate]:
    """The candidates ``include`` / ``exclude`` (or the deprecated exact ``candidates``) allow."""
    if candidates is not None:
        warnings.warn("plan_layers(candidates=[names]) is now include= (module-name globs or types); the "
                      "old name will be removed in the next release", DeprecationWarning, stacklevel=3)
        unknown = sorted(set(candidates) - {c.name for c in found})
        if unknown:
            raise PangkasError(f"not removable blocks: {unknown}; candidates are {[c.name for c in found][:12]}")
        found = [c for c in found if c.name in set(candidates)]
    blocks = [(c.name, model.get_submodule(c.name)) for c in found]
    chosen = ModuleFilter(include, exclude, blocks, "removable block")
    return [c for c, (name, module) in zip(found, blocks) if chosen.allows(name, module)]


def _choose(model, found, batches, criterion: LayerImportance, count, loss_fn, metric_fn):
    """(scores, chosen blocks) by ``criterion``, the model in eval mode meanwhile."""
    with evaluating(model):
        result = criterion.choose(model, found, batches, count, loss_fn=loss_fn, metric_fn=metric_fn)
    return checked(criterion, result, found, count)


@renamed(criterion="importance")
def prune_layers(model: nn.Module, data: Iterable, **options) -> LayerReport:
    """``plan_layers(model, data, **options).apply()``."""
    return plan_layers(model, data, **options).apply()
