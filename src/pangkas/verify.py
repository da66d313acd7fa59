"""Applying a channel plan: cut the model, re-trace it, and compare every op's shapes with the plan.

Where the model's code computes sizes the plan could not follow (a reshape to a constant size,
say), the model is restored, the channels involved are kept (the plan chooses again around
them), and surgery retried. The same loop rehearses on a weightless copy while planning, so
applying rarely needs it. Whatever fails or interrupts, the model is left as it was.

The plan it works on (``channels.Plan``) gives: ``model``, ``coupling``, ``integrations``,
``retried`` (notes), ``applied``, ``keep()`` (the kept positions), ``_verify(model)`` (re-trace
and :func:`first_difference`) and ``_choose(blocks)`` (choose again, keeping ``blocks`` too).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .errors import OperationFailed, PangkasError
from .graph.trace import Coupling, OpRecord, TraceFailed
from .inputs import call_model
from .markers import RESHAPED
from .modules import evaluating
from .repeats import same_place
from .selection import Block, module_of, planned_shape
from .surgery import Undo, shrink

MAX_RETRIES = 8
# Ops that pruning may turn into each other. Slicing a dim's full range runs as alias: once
# pruning makes a slice full, that is the same op. reshape copies a non-contiguous input (clone,
# then _unsafe_view); with one head left, a transposed view can become contiguous, so the copy
# disappears (a copy never changes values or shape) and a plain view remains.
_SAME = ({"aten.slice.Tensor", "aten.alias.default"}, {"aten.view.default", "aten._unsafe_view.default"})
_COPY = "aten.clone.default"

Problem = tuple[OpRecord, str]  # the traced op where the pruned model departs from the plan, and how


def apply(plan) -> Callable[[], None]:
    """Cut ``plan.model`` until it verifies and mark the plan applied. Returns a function that
    reverts both, for a caller whose next step fails; it holds the uncut tensors: drop it as
    soon as that step is done."""
    if plan.applied:
        raise PangkasError("this plan was already applied; make a new plan for further pruning")
    check_unchanged(plan.model, plan.coupling)
    reshaped = vars(plan.model).get(RESHAPED)
    undo = converge(plan, plan.model)
    try:
        runs_as_itself(plan.model, plan.example_inputs)
    except BaseException:
        undo.restore()
        raise
    plan.applied = True
    setattr(plan.model, RESHAPED, True)

    def revert() -> None:
        undo.restore()
        vars(plan.model).pop(RESHAPED)
        if reshaped is not None:
            setattr(plan.model, RESHAPED, reshaped)
        plan.applied = False

    return revert


def runs_as_itself(model: nn.Module, example_inputs) -> None:
    """Run the cut model as it is, untraced: the trace may follow a module through a same-maths
    subclass (an integration's ``traced_as``), so the module's own code must be checked too. A
    model without weights (on ``meta``) whose code reads values cannot run: the re-trace is its
    check."""
    try:
        with evaluating(model), torch.no_grad():
            call_model(model, example_inputs)
    except Exception as exc:
        if "meta" in str(exc) and all(p.is_meta for p in model.parameters()):
            return  # code that reads values cannot run without weights: the re-trace verified the cut
        raise OperationFailed(f"the pruned model verified as traced but does not run as itself "
                              f"({type(exc).__name__}: {exc}); the model is unchanged") from exc


def rehearse(plan) -> None:
    """Run surgery and verification on a copy of the model without weights, so the plan
    already accounts for what the model's code cannot follow. A model that does not run on
    meta tensors (it builds tensors of its own device, or reads values) is checked at apply
    time only: its ops may differ between devices."""
    if not plan.coupling.on_meta:
        return
    try:
        converge(plan, meta_clone(plan.model), rehearsal=True)
    except _NoRehearsal:
        pass


def converge(plan, model: nn.Module, rehearsal: bool = False) -> Undo:
    """Cut ``model`` to the plan until it verifies; returns the ``Undo`` of the surgery that
    stayed. Each failure keeps more channels in the plan (and adds a note to ``plan.retried``)."""
    failures = Counter()
    for _ in range(MAX_RETRIES):
        undo = shrink(model, plan.keep(), plan.integrations.updater_for, plan.integrations.fix)
        try:
            problem = plan._verify(model)
        except BaseException:  # an interrupt (or a bug) while checking: the model goes back first
            undo.restore()
            raise
        if rehearsal and problem is not None and "device" in problem[1]:
            raise _NoRehearsal
        if problem is None:
            return undo
        undo.restore()
        failures[id(problem[0])] += 1
        note, blocks = _what_to_keep(plan.coupling, problem, again=failures[id(problem[0])] > 1)
        plan.retried.append(note)
        plan._choose(blocks)
    raise OperationFailed("channel surgery did not verify after several retries; the model is unchanged. "
                          + "; ".join(plan.retried[-3:]))


def first_difference(expected: Sequence[OpRecord], records: Sequence[OpRecord],
                     removed: torch.Tensor) -> Problem | None:
    """The first op of the pruned model's trace ``records`` whose shapes differ from the
    original trace ``expected`` with the positions ``removed`` gone, or None."""
    i = j = 0
    while i < len(expected) and j < len(records):
        old, new = expected[i], records[j]
        if old.name != new.name and {old.name, new.name} not in _SAME:
            if _COPY in (old.name, new.name):
                i, j = (i + 1, j) if old.name == _COPY else (i, j + 1)
                continue
            return old, f"the pruned model runs {new.name} where {old.name} ran before"
        want = [planned_shape(o, removed) for o in old.outputs]
        got = [o[0] for o in new.outputs]
        if want != got:
            return old, f"output shapes {got}, planned {want}"
        i, j = i + 1, j + 1
    rest = [r for r in [*expected[i:], *records[j:]] if r.name != _COPY]
    if rest:
        return expected[min(i, len(expected) - 1)], "the pruned model runs a different number of ops"
    return None


def where_it_fails(expected: Sequence[OpRecord], failed: TraceFailed) -> Problem:
    """The op of the original trace at which the pruned model's forward raised: the one after
    the ops it ran, step by step, except that a copy pruning made unnecessary (or necessary) is
    skipped: counting alone would blame the wrong op after it."""
    i = j = 0
    ran = failed.records
    while i < len(expected) - 1 and j < len(ran):
        old, new = expected[i], ran[j]
        if old.name != new.name and _COPY in (old.name, new.name):
            i, j = (i + 1, j) if old.name == _COPY else (i, j + 1)
        else:  # the same op, or one the device runs under another name: step together
            i, j = i + 1, j + 1
    return expected[i], f"the pruned model fails here ({failed})"


def check_unchanged(model: nn.Module, coupling: Coupling) -> None:
    """Refuse a model whose tensors no longer have the shapes ``coupling`` was traced with."""
    state = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    for name, ids in coupling.tensor_ids.items():
        if name not in state or tuple(state[name].shape) != tuple(len(i) for i in ids):
            raise PangkasError(f"the model changed since this plan was made ({name}); make a new plan")


def meta_clone(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device (no data)."""
    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):
        meta = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


class _NoRehearsal(Exception):
    """The weightless copy runs differently from the model (device-dependent code)."""


def _what_to_keep(coupling: Coupling, problem: Problem, again: bool) -> tuple[str, list[Block]]:
    """(the note, the blocks) for a failed check: the channels of the failing op and of the same
    op in every repetition of its layer; when that op failed before, every channel of its module
    (the cause lies elsewhere in it: a size tied to another tensor)."""
    record, why = problem
    where = record.module or "model"
    if not again:
        records = _same_code(coupling.records, record)
        more = f" (and {len(records) - 1} more like it)" if len(records) > 1 else ""
        note, blocks = f"kept channels at {record.name} in {where}{more}: {why}", []
    else:
        records = [r for r in coupling.records if _inside(r.module, record.module)]
        note, blocks = f"kept every channel of {where}: {why}", _module_blocks(coupling, record.module, why)
    blocks += [(ax.ids, f"surgery check: {why}") for r in records for _, axes in r.inputs + r.outputs for ax in axes]
    return note, blocks


def _same_code(records: Sequence[OpRecord], record: OpRecord) -> list[OpRecord]:
    """Records of the same op at the same place in every repetition of a layer (module paths
    equal up to their indices, ``layers.*.self_attn``): the same line of code, which fails
    the same way everywhere."""
    def signature(index, r):
        return same_place(r.module), r.name, occurrence[index]

    occurrence, seen = [], Counter()
    for r in records:
        occurrence.append(seen[(r.module, r.name)])
        seen[(r.module, r.name)] += 1
    indexed = list(enumerate(records))
    target = next(signature(i, r) for i, r in indexed if r is record)
    return [r for i, r in indexed if signature(i, r) == target]


def _module_blocks(coupling: Coupling, module: str, why: str) -> list[Block]:
    return [(ids, f"post-surgery check: {why}")
            for name, dims in coupling.tensor_ids.items() if _inside(module_of(name), module) for ids in dims]


def _inside(module: str, container: str) -> bool:
    return not container or module == container or module.startswith(container + ".")
