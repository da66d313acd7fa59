"""Channel pruning: ``plan_channels`` decides what goes, ``Plan.apply`` removes it physically.

Data flows one way: trace (coupling classes) -> groups -> importance -> selection -> plan ->
surgery -> verification. Verification re-traces the pruned model and compares every intermediate
shape with the plan; where the model's code computes sizes the plan could not follow (a reshape
with a constant size, say), the model is restored, those channels are kept, and surgery retried.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from .integrations import Integrations
from .integrations import active as active_integrations
from .deprecation import renamed
from .errors import OperationFailed, PangkasError
from .graph.labels import components
from .graph.trace import Coupling, TraceFailed, count_flops, run_traced, trace
from .importance import Slice
from .importance import resolve as resolve_importance
from .markers import RESHAPED
from .modules import Selector, as_patterns, matches
from .repeats import same_place
from .reports import Report
from .surgery import shrink
from .tables import human_count, render_table
from .widths import fastest, layer_timer

MAX_RETRIES = 8
# Ops that pruning may turn into each other. Slicing a dim's full range runs as alias: once
# pruning makes a slice full, that is the same op. reshape copies a non-contiguous input (clone,
# then _unsafe_view); with one head left, a transposed view can become contiguous, so the copy
# disappears (a copy never changes values or shape) and a plain view remains.
_SAME = ({"aten.slice.Tensor", "aten.alias.default"}, {"aten.view.default", "aten._unsafe_view.default"})
_COPY = "aten.clone.default"


@dataclass(frozen=True)
class Options:
    ratio: float
    importance: object
    scope: str
    ratios: dict
    round_to: int | str
    max_ratio: float
    allow_approximate: bool


@dataclass
class Group:
    """Channels removed together as one unit of the ratio (one layer's outputs, a residual stream)."""

    modules: tuple[str, ...]
    classes: torch.Tensor       # class representatives (ids)
    scores: torch.Tensor
    removed: torch.Tensor       # bool per class
    approximate: bool = False

    @property
    def kept(self) -> int:
        return int((~self.removed).sum())


@dataclass
class Selection:
    """Everything derived from the coupling for one set of blocks."""

    classes: torch.Tensor       # id -> class representative (0: fixed)
    removed: torch.Tensor       # bool per id: position is removed
    groups: list[Group]


def _validate(ratio, scope, ratios, round_to, max_ratio, importance, data, loss_fn) -> None:
    def bad_ratio(r):
        return not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 <= r < 1

    if bad_ratio(ratio):
        raise PangkasError(f"ratio must be a number in [0, 1) (the fraction of channels removed), got {ratio!r}")
    if scope not in ("local", "global"):
        raise PangkasError(f"scope must be 'local' or 'global', got {scope!r}")
    for key, r in (ratios or {}).items():
        if bad_ratio(r):
            raise PangkasError(f"ratios[{key!r}] must be in [0, 1), got {r!r}")
    if round_to != "auto" and (not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1):
        raise PangkasError(f"round_to must be an integer >= 1 or 'auto', got {round_to!r}")
    if max_ratio is not None and (bad_ratio(max_ratio) or max_ratio < ratio):
        raise PangkasError(f"max_ratio must be in [ratio, 1), got {max_ratio!r}")
    resolve_importance(importance, data, loss_fn)


class Plan:
    """What channel pruning would remove; nothing changes until :meth:`apply`."""

    def __init__(self, model, example_inputs, coupling: Coupling, options: Options, scores: dict,
                 integrations: Integrations):
        self.model = model
        self.integrations = integrations  # what surgery and its check need to know of model families
        self.example_inputs = example_inputs
        self.coupling = coupling
        self.options = options
        self._slice_scores = scores
        self.retried: list[str] = []
        self.applied = False
        self.params_before = _count_params(model, coupling, None)
        self.macs_before = count_flops(coupling.records) // 2
        self.selection = self._select()
        self._rehearse()

    # -- selection ---------------------------------------------------------------------------

    def _select(self) -> Selection:
        """Choose removals, then keep any channel whose removal no tensor shape could express,
        until every traced tensor stays rectangular."""
        while True:
            selection = select(self.coupling, self.options, self._slice_scores, self.model)
            broken = _non_rectangular(self.coupling, selection)
            if not broken:
                return selection
            self.coupling.extra_blocks.extend((ids, "removal would not leave a rectangular tensor")
                                              for ids in broken)

    # -- numbers -----------------------------------------------------------------------------

    def keep(self) -> dict[str, list[torch.Tensor | None]]:
        """Per tensor name, per dim: the kept positions (None where nothing is removed)."""
        removed = self.selection.removed
        keep = {}
        for name, dims in self.coupling.tensor_ids.items():
            per_dim = [None if not removed[ids].any() else torch.nonzero(~removed[ids]).flatten()
                       for ids in dims]
            if any(k is not None for k in per_dim):
                keep[name] = per_dim
        return keep

    def _planned_shape(self, shaped) -> tuple[int, ...]:
        return planned_shape(shaped, self.selection.removed)

    @property
    def params_after(self) -> int:
        return _count_params(self.model, self.coupling, self.selection.removed)

    @property
    def macs_after(self) -> int:
        return count_flops(self.coupling.records, self._planned_shape) // 2

    @property
    def channels_removed(self) -> int:
        return sum(int(g.removed.sum()) for g in self.selection.groups)

    def blocked(self) -> Counter:
        """Why channels are kept: reason -> how many channels (of conv/linear/embedding outputs)
        it froze; one channel may be frozen for several reasons."""
        coupling = self.coupling
        joined = components(coupling.num_ids, *coupling.unions)  # classes before any block
        produced = torch.zeros(coupling.num_ids, dtype=torch.bool)
        produced[joined[coupling.produced]] = True
        frozen: dict[str, list[torch.Tensor]] = {}
        blocks = coupling.blocks + coupling.extra_blocks
        if not self.options.allow_approximate:
            blocks = blocks + [(ids, f"approximate: {why}") for ids, why in coupling.approximations]
        for ids, why in blocks:
            # The same rule in many modules is one reason: "(native_layer_norm in a.b)" -> "(native_layer_norm)"
            frozen.setdefault(re.sub(r" in [^()]*\)$", ")", why), []).append(joined[ids])
        reasons = Counter()
        for why, parts in frozen.items():
            classes = torch.cat(parts).unique()
            n = int(produced[classes].sum())
            if n:
                reasons[why] = n
        return reasons

    def __str__(self) -> str:
        rows = []
        for g in self.selection.groups:
            if g.removed.any():
                shown = ", ".join(g.modules[:3]) + (f" +{len(g.modules) - 3}" if len(g.modules) > 3 else "")
                rows.append((shown or "(unnamed)", len(g.classes), g.kept,
                             f"{g.removed.float().mean():.0%}" + (" ~" if g.approximate else "")))
        title = (f"channel plan: ratio={self.options.ratio} ({self.options.scope}), "
                 f"importance={getattr(self.options.importance, '__name__', self.options.importance)}")
        text = render_table(title, ("group (producers)", "channels", "kept", "removed"), rows)
        text += (f"\nparams {human_count(self.params_before)} -> {human_count(self.params_after)}, "
                 f"MACs {human_count(self.macs_before)} -> {human_count(self.macs_after)}, "
                 f"{len(rows)} of {len(self.selection.groups)} groups pruned")
        if any(g.approximate and g.removed.any() for g in self.selection.groups):
            text += "\n~ approximate: these channels are normalised together (LayerNorm/GroupNorm/attention scale)"
        kept = self.blocked()
        if kept:
            text += "\nkept because of: " + "; ".join(f"{why} [{n}]" for why, n in kept.most_common(5))
        for note in self.retried:
            text += f"\nsurgery check: {note}"
        return text

    # -- surgery -----------------------------------------------------------------------------

    def apply(self) -> "ChannelReport":
        """Remove the planned channels from the model, verify every traced shape, and report.

        Transactional: if the pruned model does not run or computes shapes the plan did not
        predict, it is restored, the channels involved are kept, and surgery is retried; if that
        does not converge, the model is restored and ``PangkasError`` raised. (The plan already
        rehearsed this on a weightless copy, so retries here are rare.)
        """
        return self._apply()[0]

    def _apply(self):
        """:meth:`apply`, and a function that reverts it for a caller whose next step fails. It
        holds the uncut tensors: drop it as soon as that step is done."""
        if self.applied:
            raise PangkasError("this plan was already applied; make a new plan for further pruning")
        self._check_unchanged()
        reshaped = vars(self.model).get(RESHAPED)
        undo = self._converge(self.model)
        self.applied = True
        setattr(self.model, RESHAPED, True)

        def revert() -> None:
            undo.restore()
            vars(self.model).pop(RESHAPED)
            if reshaped is not None:
                setattr(self.model, RESHAPED, reshaped)
            self.applied = False

        return ChannelReport(self), revert

    def _rehearse(self) -> None:
        """Run surgery and verification on a copy of the model without weights, so the plan
        already accounts for what the model's code cannot follow. A model that does not run on
        meta tensors (it builds tensors of its own device, or reads values) is checked at apply
        time only: its ops may differ between devices."""
        if not self.coupling.on_meta:
            return
        try:
            self._converge(_meta_clone(self.model), rehearsal=True)
        except _NoRehearsal:
            pass

    def _converge(self, model: nn.Module, rehearsal: bool = False):
        """Cut ``model`` until it verifies; returns the ``Undo`` of the surgery that stayed."""
        failures = Counter()
        for _ in range(MAX_RETRIES):
            undo = shrink(model, self.keep(), self.integrations.updater_for, self.integrations.fix)
            try:
                problem = self._verify(model)
            except BaseException:  # an interrupt (or a bug) while checking: the model goes back first
                undo.restore()
                raise
            if rehearsal and problem is not None and "device" in problem[1]:
                raise _NoRehearsal
            if problem is None:
                return undo
            undo.restore()
            record, why = problem
            failures[id(record)] += 1
            where = record.module or "model"
            if failures[id(record)] == 1:
                records = self._same_code(record)
                more = f" (and {len(records) - 1} more like it)" if len(records) > 1 else ""
                self.retried.append(f"kept channels at {record.name} in {where}{more}: {why}")
            else:  # the cause lies elsewhere in the module (a size tied to another tensor)
                self.retried.append(f"kept every channel of {where}: {why}")
                records = [r for r in self.coupling.records if _inside(r.module, record.module)]
                self._block_module(record.module, why)
            self.coupling.extra_blocks.extend(
                (ax.ids, f"surgery check: {why}")
                for r in records for _, axes in r.inputs + r.outputs for ax in axes)
            self.selection = self._select()
        raise OperationFailed("channel surgery did not verify after several retries; the model is unchanged. "
                           + "; ".join(self.retried[-3:]))

    def _same_code(self, record) -> list:
        """Records of the same op at the same place in every repetition of a layer (module paths
        equal up to their indices, ``layers.*.self_attn``): the same line of code, which fails
        the same way everywhere."""
        def signature(index, r):
            return same_place(r.module), r.name, occurrence[index]

        occurrence, seen = [], Counter()
        for r in self.coupling.records:
            occurrence.append(seen[(r.module, r.name)])
            seen[(r.module, r.name)] += 1
        indexed = list(enumerate(self.coupling.records))
        target = next(signature(i, r) for i, r in indexed if r is record)
        return [r for i, r in indexed if signature(i, r) == target]

    def _block_module(self, module: str, why: str) -> None:
        for name, ids in self.coupling.tensor_ids.items():
            if _inside(_module_of(name), module):
                self.coupling.extra_blocks.extend((i, f"post-surgery check: {why}") for i in ids)

    def _check_unchanged(self) -> None:
        state = dict(self.model.named_parameters(remove_duplicate=False)) | dict(
            self.model.named_buffers(remove_duplicate=False))
        for name, ids in self.coupling.tensor_ids.items():
            if name not in state or tuple(state[name].shape) != tuple(len(i) for i in ids):
                raise PangkasError(f"the model changed since this plan was made ({name}); make a new plan")

    def _verify(self, model: nn.Module):
        """(record, reason) of the first op whose pruned shapes differ from the plan, or None."""
        expected = self.coupling.records
        try:
            _, records, _ = run_traced(model, self.example_inputs, traced_as=self.integrations.traced_as)
        except TraceFailed as failed:
            index = min(len(failed.records), len(expected) - 1)
            return expected[index], f"the pruned model fails here ({failed})"
        i = j = 0
        while i < len(expected) and j < len(records):
            old, new = expected[i], records[j]
            if old.name != new.name and {old.name, new.name} not in _SAME:
                if _COPY in (old.name, new.name):
                    i, j = (i + 1, j) if old.name == _COPY else (i, j + 1)
                    continue
                return old, f"the pruned model runs {new.name} where {old.name} ran before"
            want = [self._planned_shape(o) for o in old.outputs]
            got = [o[0] for o in new.outputs]
            if want != got:
                return old, f"output shapes {got}, planned {want}"
            i, j = i + 1, j + 1
        rest = [r for r in expected[i:] + records[j:] if r.name != _COPY]
        if rest:
            return expected[min(i, len(expected) - 1)], "the pruned model runs a different number of ops"
        return None


@dataclass
class ChannelReport(Report):
    """What ``Plan.apply`` / ``prune_channels`` did."""

    plan: Plan
    kind = "channels"
    params_before: int = field(init=False)
    macs_before: int = field(init=False)
    params_after: int = field(init=False)
    macs_after: int = field(init=False)

    def __post_init__(self):
        self.params_before, self.macs_before = self.plan.params_before, self.plan.macs_before
        self.params_after = sum(p.numel() for p in self.plan.model.parameters())
        self.macs_after = self.plan.macs_after

    @property
    def channels_removed(self) -> int:
        return self.plan.channels_removed

    def details(self) -> dict:
        groups = [{"modules": list(g.modules), "channels": len(g.classes), "kept": g.kept}
                  for g in self.plan.selection.groups if g.removed.any()]
        return {"channels_removed": self.channels_removed, "groups": groups,
                "kept_because": dict(self.plan.blocked())}

    def __str__(self) -> str:
        return str(self.plan).replace("channel plan", "channels removed", 1)


# -- the pieces --------------------------------------------------------------------------------

def planned_shape(shaped, removed: torch.Tensor) -> tuple[int, ...]:
    shape, axes = shaped
    shape = list(shape)
    for ax in axes:
        kept = ~removed[ax.ids]
        for pos, d in enumerate(ax.dims):
            others = [i for i in range(kept.ndim) if i != pos]
            shape[d] = int(kept.any(others).sum()) if others else int(kept.sum())
    return tuple(shape)


def _non_rectangular(coupling: Coupling, selection: Selection) -> list[torch.Tensor]:
    """Axes over several dims whose kept positions are not a full grid, or that would vanish."""
    broken, seen = [], set()
    for record in coupling.records:
        for _, axes in record.inputs + record.outputs:
            for ax in axes:
                if id(ax) in seen:
                    continue
                seen.add(id(ax))
                kept = ~selection.removed[ax.ids]
                if not kept.any():
                    broken.append(ax.ids)
                elif kept.ndim > 1:
                    grid = torch.ones_like(kept)
                    for pos in range(kept.ndim):
                        others = [i for i in range(kept.ndim) if i != pos]
                        shape = [1] * kept.ndim
                        shape[pos] = kept.shape[pos]
                        grid = grid & kept.any(others).reshape(shape)
                    if not torch.equal(grid, kept):
                        broken.append(ax.ids)
    return broken


def _count_params(model: nn.Module, coupling: Coupling, removed: torch.Tensor | None) -> int:
    total = 0
    for name, p in model.named_parameters():
        ids = coupling.tensor_ids.get(name)
        if removed is None or ids is None:
            total += p.numel()
        else:
            n = 1
            for dim_ids in ids:
                n *= int((~removed[dim_ids]).sum())
            total += n
    return total


class _NoRehearsal(Exception):
    pass


def _meta_clone(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device (no data)."""
    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):
        meta = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _inside(module: str, container: str) -> bool:
    return not container or module == container or module.startswith(container + ".")


def _module_of(name: str) -> str:
    module = name.rsplit(".", 1)[0] if "." in name else ""
    return module.split(".parametrizations.")[0]


def _class_scores(coupling: Coupling, classes: torch.Tensor, scores: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(the prunable classes, each class's summed score): every (tensor, dim) adds its
    per-position scores to the classes of its positions."""
    score = torch.zeros(coupling.num_ids)
    present = torch.zeros(coupling.num_ids, dtype=torch.bool)
    for name, dims in coupling.tensor_ids.items():
        for dim, ids in enumerate(dims):
            reps = classes[ids]
            present[reps] = True
            if (name, dim) in scores:
                score.index_add_(0, reps, scores[(name, dim)].to(score.dtype))
    present[0] = False
    return torch.nonzero(present).flatten(), score


def _grouping(coupling: Coupling, classes: torch.Tensor) -> tuple[torch.Tensor, dict[int, dict[str, None]]]:
    """Each class's group, and the modules producing each class. Classes produced by the same
    parameter dim (one layer's outputs) are one group; a residual stream merges its producers."""
    is_produced = torch.zeros(coupling.num_ids, dtype=torch.bool)
    is_produced[coupling.produced] = True
    producers: dict[int, dict[str, None]] = {}
    left, right = [], []
    for name, dims in coupling.tensor_ids.items():
        for ids in dims:
            reps = classes[ids][is_produced[ids] & (classes[ids] != 0)]
            if reps.numel():
                left.append(reps[:-1])
                right.append(reps[1:])
                for rep in reps.unique().tolist():
                    producers.setdefault(rep, {})[_module_of(name)] = None
    empty = torch.zeros(0, dtype=torch.long)
    return components(coupling.num_ids, torch.cat(left) if left else empty,
                      torch.cat(right) if right else empty), producers


def select(coupling: Coupling, options: Options, scores: dict, model: nn.Module) -> Selection:
    """Classes from the coupling, grouped, scored, and the lowest of each group marked removed."""
    classes = coupling.classes(options.allow_approximate)
    approximate = torch.zeros(coupling.num_ids, dtype=torch.bool)
    for ids, _ in coupling.approximations:
        approximate[classes[ids]] = True
    reps, score = _class_scores(coupling, classes, scores)
    group_of, producers = _grouping(coupling, classes)
    members: dict[int, list[int]] = {}
    for rep, g in zip(reps.tolist(), group_of[reps].tolist()):
        members.setdefault(g, []).append(rep)
    groups = []
    for ids in members.values():
        cls = torch.tensor(ids)
        modules = tuple(dict.fromkeys(n for m in ids for n in producers.get(m, ())))
        groups.append(Group(modules, cls, score[cls], torch.zeros(len(ids), dtype=torch.bool),
                            bool(approximate[cls].any())))
    _choose(groups, options, model, coupling)
    removed_class = torch.zeros(coupling.num_ids, dtype=torch.bool)
    for g in groups:
        removed_class[g.classes[g.removed]] = True
    return Selection(classes, removed_class[classes], groups)


def _group_ratio(group: Group, options: Options, model: nn.Module) -> float:
    for pattern, r in options.ratios.items():
        for name in group.modules:
            module = model.get_submodule(name) if name else model
            if matches(pattern, name, module):
                return r
    return options.ratio


def _choose(groups: list[Group], options: Options, model: nn.Module, coupling: Coupling) -> None:
    """Mark the lowest-scoring classes of each group removed, per the ratio and scope."""
    def remove(g, n):
        timer = _producer_timer(g, model, coupling) if options.round_to == "auto" else None
        _remove_lowest(g, n, options, timer)

    if options.scope == "local" or options.ratios:
        for g in groups:
            remove(g, round(_group_ratio(g, options, model) * len(g.classes)))
        return
    # Global: rank all classes by score normalised within their group, remove the lowest.
    ranked = []
    for g in groups:
        mean = g.scores.mean()
        normed = g.scores / mean if mean > 0 else g.scores
        ranked.extend((float(s), id(g), i) for i, s in enumerate(normed))
    total = round(options.ratio * len(ranked))
    cap = {id(g): min(len(g.classes) - 1, int(options.max_ratio * len(g.classes))) for g in groups}
    count = Counter()
    by_id = {id(g): g for g in groups}
    for s, gid, i in sorted(ranked):
        if total == 0:
            break
        if count[gid] < cap[gid]:
            count[gid] += 1
            total -= 1
    for gid, n in count.items():
        remove(by_id[gid], n)


def _producer_timer(group: Group, model: nn.Module, coupling: Coupling):
    """Times the group's first producing conv/Linear at a given output width (round_to="auto")."""
    for name in group.modules:
        module = model.get_submodule(name) if name else model
        for r in coupling.records:
            if r.module == name and r.name.startswith(("aten.convolution", "aten.addmm", "aten.mm")):
                x = r.inputs[1] if r.name.startswith("aten.addmm") else r.inputs[0]
                timer = layer_timer(module, x[0])
                if timer is not None:
                    return timer
    return None


def _remove_lowest(group: Group, n: int, options: Options, timer=None) -> None:
    size = len(group.classes)
    keep = max(1, size - n)
    if options.round_to == "auto":
        keep = fastest(keep, size, timer) if timer is not None else keep
    elif options.round_to > 1:
        keep = min(size, -(-keep // options.round_to) * options.round_to)
    order = torch.argsort(group.scores, stable=True)
    group.removed[:] = False
    group.removed[order[: size - keep]] = True


def _selection_blocks(model: nn.Module, coupling: Coupling, include: Selector, exclude: Selector) -> None:
    """Keep every channel that touches a module ``include`` leaves out or ``exclude`` names."""
    includes, excludes = as_patterns(include), as_patterns(exclude)
    named = list(model.named_modules())
    for label, patterns in (("include", includes), ("exclude", excludes)):
        for pattern in patterns:
            if not any(matches(pattern, n, m) for n, m in named):
                shown = pattern.__name__ if isinstance(pattern, type) else repr(pattern)
                raise PangkasError(f"{label} entry {shown} matches no module of {type(model).__name__}")
    for name, ids in coupling.tensor_ids.items():
        module_name = _module_of(name)
        module = model.get_submodule(module_name) if module_name else model
        if any(matches(p, module_name, module) for p in excludes):
            why = f"exclude={module_name}"
        elif includes and not any(matches(p, module_name, module) for p in includes):
            why = f"not in include= ({module_name or type(model).__name__})"
        else:
            continue
        coupling.extra_blocks.extend((dim_ids, why) for dim_ids in ids)


@renamed(ignore="exclude")
def plan_channels(
    model: nn.Module,
    example_inputs,
    *,
    ratio: float,
    importance="l1",
    scope: str = "local",
    ratios: dict | None = None,
    include: Selector = None,
    exclude: Selector = None,
    round_to: int = 1,
    max_ratio: float | None = None,
    data=None,
    loss_fn=None,
    allow_approximate: bool = False,
    prune_outputs: bool = False,
    integrations: list | None = None,
) -> Plan:
    """Plan the removal of ``ratio`` of the channels of every coupled group (``scope="local"``)
    or of all channels ranked together (``scope="global"``, scores normalised per group).

    ``importance``: ``"l1"`` (default), ``"l2"``, ``"fpgm"``, ``"bn_scale"`` (|BatchNorm gamma|;
    l1 where a group has none), ``"taylor"`` (|w * grad| over ``data`` with
    ``loss_fn(output, batch)``), ``"wanda"`` (|w| x input activation norm over ``data``),
    ``"random"``, any name given to ``pangkas.importance.register``, a
    ``pangkas.importance.Importance`` object, or ``fn(tensor, dim) -> scores``. ``ratios`` maps
    module globs or types to their own ratio; ``include`` / ``exclude`` (module-name globs or
    types) say which modules may lose channels: a channel goes only if every tensor it touches may
    be touched (``exclude`` was called ``ignore``); ``round_to`` keeps
    channel counts multiples of it, or with ``"auto"`` picks per layer the nearby count that runs
    fastest on this CPU (measured); ``max_ratio`` caps any group's removal under global scope.
    The model's outputs keep their channels unless ``prune_outputs=True`` (an encoder whose
    output is its hidden state, when pruning hidden size). Channels under a normalisation across channels
    (LayerNorm, GroupNorm) or an attention scale tied to head_dim are kept unless
    ``allow_approximate=True``: removing them cannot be exact. ``integrations``: model families
    (``pangkas.integrations.Integration``) to know in this call, besides the registered ones.
    """
    _validate(ratio, scope, ratios, round_to, max_ratio, importance, data, loss_fn)
    known = active_integrations(integrations)
    coupling = trace(model, example_inputs, adapter=known.adapter(model), keep_outputs=not prune_outputs,
                     traced_as=known.traced_as)
    _selection_blocks(model, coupling, include, exclude)
    options = Options(ratio, importance, scope, dict(ratios or {}), round_to,
                      1.0 if max_ratio is None else max_ratio, allow_approximate)
    scores = _scores(model, coupling, importance, data, loss_fn)
    return Plan(model, example_inputs, coupling, options, scores, known)


def _scores(model, coupling: Coupling, importance, data, loss_fn) -> dict:
    """Scale-free scores per (tensor name, dim) of the traced tensors, by the importance criterion."""
    if any(p.device.type == "meta" for p in model.parameters()):
        return {}  # no weights to judge: channels go by position (the plan's structure still holds)
    criterion = resolve_importance(importance, data, loss_fn)
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    slices = [Slice(name, dim, len(ids), params[name].detach() if name in params else None,
                    _module_of(name), modules.get(_module_of(name)), ids, coupling.produced)
              for name, dims in coupling.tensor_ids.items() for dim, ids in enumerate(dims)]
    return criterion.scores(slices, criterion.measure(model, data, loss_fn))


@renamed(ignore="exclude")
def prune_channels(model: nn.Module, example_inputs, **options) -> ChannelReport:
    """``plan_channels(model, example_inputs, **options).apply()``."""
    return plan_channels(model, example_inputs, **options).apply()
