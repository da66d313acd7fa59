"""Channel pruning: ``plan_channels`` decides what goes, ``Plan.apply`` removes it physically.

Data flows one way: trace (the coupling, read-only) -> importance scores -> selection (pure, see
``selection``) -> plan -> surgery and verification (see ``verify``). Verification re-traces the
pruned model and compares every intermediate shape with the plan; where the model's code computes
sizes the plan could not follow (a reshape with a constant size, say), the model is restored,
those channels are kept, and surgery retried.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from . import verify
from .allocation import check as check_allocation, reallocate
from .deprecation import renamed
from .errors import OperationFailed, PangkasError
from .graph.labels import components
from .graph.trace import Coupling, TraceFailed, count_flops, run_traced, trace
from .importance import Importance, Scores, Slice
from .importance import resolve as resolve_importance
from .integrations import Integrations
from .integrations import active as active_integrations
from .modules import Selector
from .reconstruct import reconstruct
from .reports import Report
from .selection import (Block, Group, Options, Selection, blocks_outside, count_params, module_of, planned_shape,
                        ratio_source, select,
                        select_rectangular)
from .tables import human_count, render_table
from .widths import layer_timer

__all__ = ["ChannelReport", "Group", "Options", "Plan", "Selection", "plan_channels", "planned_shape",
           "prune_channels", "select"]


class Plan:
    """What channel pruning would remove; nothing changes until :meth:`apply`.

    ``selection`` is what was decided, from ``coupling`` (the trace, never changed), ``scores``
    (per tensor name and dim) and ``blocks``: the channels kept beyond the trace's own blocks
    (include/exclude, shapes no tensor could take, what the surgery check found), each with why.
    ``retried`` notes each surgery check that failed."""

    def __init__(self, model, example_inputs, coupling: Coupling, options: Options, scores: dict,
                 integrations: Integrations, blocks: Sequence[Block] = ()):
        self.model = model
        self.integrations = integrations  # what surgery and its check need to know of model families
        self.example_inputs = example_inputs
        self.coupling = coupling
        self.options = options
        self.scores = scores
        self.blocks: list[Block] = []
        self.retried: list[str] = []
        self.applied = False
        self.reconstruct_on: list | None = None  # calibration batches, when apply() reconstructs
        self.data_aware = False  # whether importance read the data (else the plan says it is data-free)
        self.params_before = count_params(model, coupling, None)
        self.macs_before = count_flops(coupling.records) // 2
        self._choose(blocks)

    def _choose(self, blocks: Sequence[Block]) -> None:
        """(Re)choose what goes around the plan's blocks, after adding ``blocks`` to them."""
        self.blocks += blocks
        self.selection, added = select_rectangular(self.coupling, self.options, self.scores, self.model,
                                                   self.blocks, partial(_producer_timer, model=self.model,
                                                                        coupling=self.coupling))
        self.blocks += added

    # -- numbers -----------------------------------------------------------------------------

    def keep(self) -> dict[str, list[torch.Tensor | None]]:
        """Per tensor name, per dim: the kept positions (None where nothing is removed); for a
        dim cut per row-block of dim 0 (a grouped conv's inputs), the kept positions per block."""
        selection = self.selection
        removed = selection.removed
        keep = {}
        for name, dims in self.coupling.tensor_ids.items():
            per_dim = [None if not removed[ids].any() else
                       selection.gathered_keep((name, dim)) if (name, dim) in selection.gathered else
                       torch.nonzero(~removed[ids]).flatten() for dim, ids in enumerate(dims)]
            if any(k is not None for k in per_dim):
                keep[name] = per_dim
        return keep

    @property
    def params_after(self) -> int:
        return count_params(self.model, self.coupling, self.selection.removed)

    @property
    def macs_after(self) -> int:
        return count_flops(self.coupling.records, partial(planned_shape, removed=self.selection.removed)) // 2

    @property
    def channels_removed(self) -> int:
        return sum(int(g.removed.sum()) for g in self.selection.groups)

    def unit_cost(self, group: Group) -> tuple[int, int]:
        """(parameters, MACs) that one class of ``group`` (a channel, a key/value group of heads)
        accounts for: what removing its first class alone would save, at the traced input size."""
        removed = self.selection.classes == group.classes[0]
        # only the ops with a cost that touch the class change it (a neuron: a few of thousands)
        touched = [r for r in self.coupling.records if r.flop_call is not None
                   and any(removed[ax.ids].any() for _, axes in (*r.inputs, *r.outputs) for ax in axes)]
        macs = count_flops(touched) - count_flops(touched, partial(planned_shape, removed=removed))
        return self.params_before - count_params(self.model, self.coupling, removed), macs // 2

    def blocked(self) -> Counter:
        """Why channels are kept: reason -> how many channels (of conv/linear/embedding outputs)
        it froze; one channel may be frozen for several reasons."""
        # The same rule in many modules is one reason: "(native_layer_norm in a.b)" -> "(native_layer_norm)"
        return self._frozen_by(lambda why: re.sub(r" in [^()]*\)$", ")", why))

    def rule_gaps(self) -> Counter:
        """Channels (counted as in :meth:`blocked`) kept because an op has no coupling rule
        or its rule failed on this call: op -> how many channels it froze (a channel two such ops
        froze counts for both; :meth:`kept_by_rule_gaps` counts it once). Empty when every op the
        model runs was followed."""
        return self._frozen_by(_rule_gap_op)

    def kept_by_rule_gaps(self) -> int:
        """How many channels (as in :meth:`rule_gaps`, each once) rule gaps keep."""
        return sum(self._frozen_by(lambda why: "gap" if _rule_gap_op(why) else None).values())

    def _frozen_by(self, key) -> Counter:
        """Channels of conv/linear/embedding outputs frozen per ``key(why)`` of every block
        (blocks whose key is None are skipped)."""
        coupling = self.coupling
        joined = components(coupling.num_ids, *coupling.unions)  # classes before any block
        produced = torch.zeros(coupling.num_ids, dtype=torch.bool)
        produced[joined[coupling.produced]] = True
        frozen: dict[str, list[torch.Tensor]] = {}
        blocks = [*coupling.blocks, *self.blocks]
        if not self.options.allow_approximate:
            blocks += [(ids, f"approximate: {why}") for ids, why in coupling.approximations]
        for ids, why in blocks:
            if (reason := key(why)) is not None:
                frozen.setdefault(reason, []).append(joined[ids])
        reasons = Counter()
        for reason, parts in frozen.items():
            n = int(produced[torch.cat(parts).unique()].sum())
            if n:
                reasons[reason] = n
        return reasons

    def __str__(self) -> str:
        rows = []
        for g in self.selection.groups:
            if g.removed.any():
                shown = ", ".join(g.modules[:3]) + (f" +{len(g.modules) - 3}" if len(g.modules) > 3 else "")
                rows.append((shown or "(unnamed)", len(g.classes), g.kept,
                             f"{g.removed.float().mean():.0%}" + (" ~" if g.approximate else "")))
        title = (f"channel plan: ratio={self.options.ratio} ({self.options.scope}), "
                 f"importance={getattr(self.options.importance, '__name__', self.options.importance)}"
                 + ("" if self.data_aware else " (data-free: give data= to choose by activations)"))
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
        if self.reconstruct_on is None:
            revert = verify.apply(self)
            return ChannelReport(self), revert
        for _ in range(verify.MAX_RETRIES):
            retries = len(self.retried)
            put_back = reconstruct(self, self.reconstruct_on)
            try:
                revert = verify.apply(self)
            except BaseException:
                put_back()
                raise
            if len(self.retried) == retries:
                return ChannelReport(self), lambda: (revert(), put_back())
            revert()  # the surgery check kept more channels: fit again for what really goes
            put_back()
        raise OperationFailed("channel surgery kept changing what it removes; the model is unchanged")

    def _verify(self, model: nn.Module) -> verify.Problem | None:
        """Re-trace ``model`` (cut) on the example inputs: where it departs from this plan, or None."""
        try:
            _, records, _ = run_traced(model, self.example_inputs, traced_as=self.integrations.traced_as)
        except TraceFailed as failed:
            return verify.where_it_fails(self.coupling.records, failed)
        return verify.first_difference(self.coupling.records, records, self.selection.removed)


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


@renamed(ignore="exclude")
def plan_channels(
    model: nn.Module,
    example_inputs,
    *,
    ratio: float,
    importance=None,
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
    reconstruct: bool = False,
    allocation: str = "uniform",
    scorer: Callable[[list[Slice], Importance], Scores] | None = None,
) -> Plan:
    """Plan the removal of ``ratio`` of the channels of every coupled group (``scope="local"``)
    or of all channels ranked together (``scope="global"``, scores normalised per group).

    ``importance``: by default activation-aware when ``data`` is given (``"obs"`` with
    ``reconstruct=True``: the error the re-fit leaves; else ``"wanda"``) and ``"l1"`` without
    (data-free; the plan says so), or ``"l1"``, ``"l2"``, ``"fpgm"``, ``"bn_scale"``
    (|BatchNorm gamma|; l1 where a group has none), ``"taylor"`` (|w * grad| over ``data`` with
    ``loss_fn(output, batch)``), ``"wanda"`` (|w| x input activation norm over ``data``),
    ``"obs"`` (the output error a channel's removal leaves once its readers are re-fitted, on
    ``data``), ``"random"``, any name given to ``pangkas.importance.register``, a
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
    ``reconstruct=True`` (needs ``data``): when applied, the layers that read removed channels
    re-fit their kept weights by least squares on ``data`` to keep their outputs (see
    ``pangkas.reconstruct``); without it the kept weights are left as they are.
    ``allocation="sensitivity"`` (needs ``data``): instead of one ratio everywhere, groups that
    hurt the outputs less when cut lose more, for the same parameters removed per ratio entry
    (measured on ``data``, see ``pangkas.allocation``); ``"uniform"`` (default) cuts each group alike.
    ``scorer(slices, criterion) -> scores``: where the scores come from when not from the model in
    memory (``pangkas.stream`` loads the weights block by block to score them); it is given every
    traced tensor dim and the resolved importance criterion.
    """
    if importance is None:
        importance = "l1" if data is None else "obs" if reconstruct else "wanda"
    _validate(ratio, scope, ratios, round_to, max_ratio, importance, data, loss_fn)
    if reconstruct not in (True, False):
        raise PangkasError(f"reconstruct must be True or False, got {reconstruct!r}")
    check_allocation(allocation, data, scope)
    if reconstruct:
        if data is None:
            raise PangkasError("reconstruct=True needs calibration batches: give data=")
    if reconstruct or allocation != "uniform":
        data = list(data)  # read again: importance, then the fit or the allocation
    known = active_integrations(integrations)
    coupling = trace(model, example_inputs, adapter=known.adapter(model), keep_outputs=not prune_outputs,
                     traced_as=known.traced_as)
    blocks = blocks_outside(model, coupling, include, exclude)
    options = Options(ratio, importance, scope, dict(ratios or {}), round_to,
                      1.0 if max_ratio is None else max_ratio, allow_approximate)
    scores = _scores(model, coupling, importance, data, loss_fn, scorer)
    plan = Plan(model, example_inputs, coupling, options, scores, known, blocks)
    plan.reconstruct_on = data if reconstruct else None
    plan.data_aware = resolve_importance(importance, data, loss_fn).needs_data
    if allocation == "sensitivity":
        reallocate(plan, lambda g: ratio_source(g, plan.options, model) or "ratio", data)
    verify.rehearse(plan)
    return plan


@renamed(ignore="exclude")
def prune_channels(model: nn.Module, example_inputs, **options) -> ChannelReport:
    """``plan_channels(model, example_inputs, **options).apply()``."""
    return plan_channels(model, example_inputs, **options).apply()


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


def _scores(model, coupling: Coupling, importance, data, loss_fn, scorer=None) -> dict:
    """Scale-free scores per (tensor name, dim) of the traced tensors, by the importance criterion."""
    if scorer is not None:
        return scorer(slices_of(model, coupling), resolve_importance(importance, data, loss_fn))
    if any(p.device.type == "meta" for p in model.parameters()):
        return {}  # no weights to judge: channels go by position (the plan's structure still holds)
    criterion = resolve_importance(importance, data, loss_fn)
    return criterion.scores(slices_of(model, coupling), criterion.measure(model, data, loss_fn))


def slices_of(model: nn.Module, coupling: Coupling) -> list[Slice]:
    """Every traced tensor dim of ``model``, as criteria see it."""
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    return [Slice(name, dim, len(ids), params[name].detach() if name in params else None,
                  module_of(name), modules.get(module_of(name)), ids, coupling.produced)
            for name, dims in coupling.tensor_ids.items() for dim, ids in enumerate(dims)]


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


_RULE_GAP = re.compile(r"^(?:no coupling rule for this op|rule failed: .*) \((\w+)(?: in [^()]*)?\)$", re.S)


def _rule_gap_op(why: str) -> str | None:
    """The op of a block the tracer made because it could not follow that op, else None."""
    found = _RULE_GAP.match(why)
    return found.group(1) if found else None
