"""Tracing a model once, at the ATen level, to find which channels are coupled.

The model runs on fake tensors (no compute, no memory for activations) under a
``TorchDispatchMode`` that applies the coupling rule of every op as it executes. Running the real
Python forward means any model that runs eagerly can be analysed (no graph capture to fail), and
the same tracer re-runs after surgery to check every intermediate shape against the plan.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_map
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import PangkasError
from ..macs import has_formula, op_flops
from ..modules import evaluating
from ..outputs import tensors
from .adapter import Adapter
from .labels import FIXED, Axis, Partition, components
from .rules import IGNORED, RuleError, find_rule, is_strict

Shaped = tuple  # (shape, axes): a tensor as the plan sees it


@dataclass
class OpRecord:
    """One executed op: its name, the module that ran it, its tensor inputs and outputs as
    (shape, axes), and for ops torch has a FLOP formula for, the call to count it by."""

    name: str
    module: str
    inputs: list[Shaped]
    outputs: list[Shaped]
    flop_call: tuple | None = None  # (op packet, args, kwargs) with tensors as Slot(i)


@dataclass(frozen=True)
class Slot:
    """Stands for the i-th tensor input in a recorded FLOP formula call."""

    index: int


@dataclass(frozen=True)
class Coupling:
    """What a trace found; read-only (a plan keeps its own blocks and passes them in). Ids index
    every parameter/buffer position; ``classes[id]`` is the representative of the set that must
    be removed together (0 = can never be removed)."""

    num_ids: int
    tensor_ids: dict[str, tuple[torch.Tensor, ...]]   # state-dict key -> ids per dim
    unions: tuple[torch.Tensor, torch.Tensor]
    blocks: tuple[tuple[torch.Tensor, str], ...]
    approximations: tuple[tuple[torch.Tensor, str], ...]
    consumed: torch.Tensor                               # ids read by a weight's input dim
    produced: torch.Tensor                               # ids of dims that create channels
    records: tuple[OpRecord, ...]
    on_meta: bool = True  # traced on meta tensors (else under FakeTensorMode on the model's device)
    partitions: tuple[Partition, ...] = ()  # rows that must keep equal counts (grouped convs)
    # ids an op reads into other channels' results (GRN's mean response, a weight-standardised
    # conv's input): exact to remove only where zero, so the oracle silences them at their source
    at_source: torch.Tensor = torch.zeros(0, dtype=torch.long)

    def classes(self, allow_approximate: bool = False, blocks=(), ties=()) -> torch.Tensor:
        """Each id's class representative; classes that must stay (the trace's blocks, ``blocks``
        (ids, why) given by the caller, and unless ``allow_approximate`` the approximations) are
        joined to FIXED (0). ``ties``: more (left, right) unions (partitions that fell back)."""
        blocked = [*self.blocks, *blocks, *(() if allow_approximate else self.approximations)]
        left = [self.unions[0]] + [ids.flatten() for ids, _ in blocked] + [a for a, _ in ties]
        right = ([self.unions[1]] + [torch.zeros(ids.numel(), dtype=torch.long) for ids, _ in blocked]
                 + [b for _, b in ties])
        return components(self.num_ids, torch.cat(left), torch.cat(right))


class Engine:
    """State the rules work on while the model runs."""

    def __init__(self):
        self.next_id = 1  # 0 is FIXED
        self.labels = WeakIdKeyDictionary()
        self.left: list[torch.Tensor] = []
        self.right: list[torch.Tensor] = []
        self.blocks: list[tuple[torch.Tensor, str]] = []
        self.approximations: list[tuple[torch.Tensor, str]] = []
        self.consumed: list[torch.Tensor] = []
        self.produced: list[torch.Tensor] = []
        self.partitions: list[Partition] = []
        self.at_source: list[torch.Tensor] = []
        self.weights = WeakIdKeyDictionary()  # parameters and tensors computed from them alone
        self.where = ""  # "op in module", for reasons
        self.module = ""  # the module running the current op
        self.adapter = None  # knowledge of a library's modules (see graph.adapter.Adapter)
        self.layout_before = None  # (shape, stride, offset) of self before an in-place view op

    def fresh(self, shape) -> torch.Tensor:
        n = int(torch.Size(shape).numel())
        ids = torch.arange(self.next_id, self.next_id + n).reshape(shape)
        self.next_id += n
        return ids

    def fixed(self, n: int) -> torch.Tensor:
        return torch.full((n,), FIXED, dtype=torch.long)

    def get(self, t) -> tuple[Axis, ...]:
        if not isinstance(t, torch.Tensor):
            return ()
        return self.labels.get(t, ())

    def set(self, t: torch.Tensor, labels) -> None:
        labels = tuple(ax for ax in labels if ax.ids.numel())
        for ax in labels:
            assert ax.ids.shape == tuple(t.shape[d] for d in ax.dims), (self.where, ax.dims, ax.ids.shape, t.shape)
        self.labels[t] = labels

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.left.append(a.reshape(-1))
        self.right.append(b.reshape(-1))

    def block(self, ids: torch.Tensor, why: str) -> None:
        if ids.numel():
            self.blocks.append((ids.reshape(-1), f"{why} ({self.where})"))

    def block_tensor(self, t, why: str) -> None:
        for ax in self.get(t):
            self.block(ax.ids, why)

    def approximate(self, ids: torch.Tensor, why: str) -> None:
        if ids.numel():
            self.approximations.append((ids.reshape(-1), f"{why} ({self.where})"))

    def partition(self, rows: torch.Tensor, why: str, per_row: torch.Tensor | None = None) -> None:
        """Rows of ids (groups, n) that must each keep the same number (see ``Partition``)."""
        if rows.numel() and rows.shape[0] > 1:
            self.partitions.append(Partition(rows, f"{why} ({self.where})", per_row))
        elif per_row is not None:
            self.union(rows.reshape(-1), per_row)

    def is_weight(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self.weights

    def consume(self, ids: torch.Tensor) -> None:
        self.consumed.append(ids.reshape(-1))

    def produce(self, ids: torch.Tensor) -> None:
        self.produced.append(ids.reshape(-1))

    def read_across(self, ids: torch.Tensor) -> None:
        """Channels whose values an op reads into other channels' results; exact to remove only
        if they are zero there (their producer silenced too: see ``Coupling.at_source``)."""
        self.at_source.append(ids.reshape(-1))


def _layout(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    return tuple(t.shape), tuple(t.stride()), t.storage_offset()


class _Tracer(TorchDispatchMode):
    def __init__(self, engine: Engine, module_stack: list[str], records: list[OpRecord]):
        super().__init__()
        self.engine = engine
        self.stack = module_stack
        self.records = records

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # An in-place view op (as_strided_) rewrites self's layout: its rule needs the one before.
        self.engine.layout_before = (_layout(args[0]) if torch.Tag.inplace_view in func.tags
                                     and isinstance(args[0], torch.Tensor) else None)
        out = _meta_batch_norm(func, args) or func(*args, **kwargs)
        if func.overloadpacket in IGNORED:
            return out
        e = self.engine
        e.module = self.stack[-1]
        e.where = f"{func.overloadpacket.__name__} in {self.stack[-1] or 'model'}"
        found = find_rule(func)
        # Rules compute on real id tensors: the fake mode below this one must not catch them.
        with _disable_current_modes():
            self._apply(found, func, args, kwargs, out)
        return out

    def _apply(self, found, func, args, kwargs, out):
        e = self.engine
        try:
            if found is None:
                raise LookupError("no coupling rule for this op")
            found(e, func, args, kwargs, out)
        except Exception as exc:  # a rule that cannot follow this call keeps its channels
            if found is not None and is_strict():
                raise RuleError(f"coupling rule {found.__name__} failed on {func} ({e.where}): "
                                f"{type(exc).__name__}: {exc}") from exc
            why = str(exc) if isinstance(exc, LookupError) else f"rule failed: {type(exc).__name__}: {exc}"
            for t in tensors((args, kwargs)) + tensors(out):
                e.block_tensor(t, why)
            for t in tensors(out):
                e.set(t, ())
        given = tensors((args, kwargs))
        sized = [t for t in given if t.ndim]  # 0-dim tensors are scalars (where(mask, W, 0.0))
        if sized and all(e.is_weight(t) for t in sized):  # t(W), W * mask, W.view(...)
            for t in tensors(out):
                e.weights[t] = True
        inputs = [(tuple(t.shape), e.get(t)) for t in given]
        outputs = [(tuple(o.shape), e.get(o)) for o in tensors(out)]
        flop_call = None
        if has_formula(func.overloadpacket):
            counter = iter(range(len(inputs)))
            slotted = tree_map(lambda t: Slot(next(counter)) if isinstance(t, torch.Tensor) else t, (args, kwargs))
            flop_call = (func.overloadpacket, *slotted)
        self.records.append(OpRecord(str(func), self.stack[-1], inputs, outputs, flop_call))


class _AttentionScale:
    """``scaled_dot_product_attention`` without an explicit ``scale`` divides by sqrt(head_dim).

    On some devices it reaches ATen as one op (whose rule sees ``scale``), on others decomposed
    into matmuls with the scale already a number. Wrapping the Python entry point for the trace
    marks the query/key head dims approximate either way: removing them changes the scale.
    (A TorchFunctionMode cannot see it: the ``nn.functional`` code calling it re-dispatches.)
    The wrapper is installed while any thread traces and only looks at its own thread's trace.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.users = 0
        self.original = None
        self.local = threading.local()

    @contextlib.contextmanager
    def __call__(self, engine: Engine):
        with self.lock:
            if self.users == 0:
                self.original = torch.nn.functional.scaled_dot_product_attention
                torch.nn.functional.scaled_dot_product_attention = self.watched
            self.users += 1
        self.local.engine = engine
        try:
            yield
        finally:
            self.local.engine = None
            with self.lock:
                self.users -= 1
                if self.users == 0:
                    torch.nn.functional.scaled_dot_product_attention = self.original

    def watched(self, query, key, value, *args, **kwargs):
        engine = getattr(self.local, "engine", None)
        scale = kwargs.get("scale", args[3] if len(args) > 3 else None)
        if engine is not None and scale is None:
            with _disable_current_modes():  # work on ids must not be traced as model ops
                engine.where = "scaled_dot_product_attention"
                for t in (query, key):
                    for ax in engine.get(t):
                        if t.ndim - 1 in ax.dims:
                            engine.approximate(ax.ids, "attention scale 1/sqrt(head_dim) follows head_dim")
        return self.original(query, key, value, *args, **kwargs)


_attention_scale = _AttentionScale()


def _meta_batch_norm(func, args):
    """Batch norm's meta kernel is a slow Python decomposition; its output shapes are trivial."""
    if func is not torch.ops.aten.native_batch_norm.default or args[0].device.type != "meta":
        return None
    x, training = args[0], args[5]
    stats = x.shape[1] if training else 0
    return torch.empty_like(x), x.new_empty(stats), x.new_empty(stats)


def count_flops(records: list[OpRecord], shape_of=lambda shaped: shaped[0]) -> int:
    """FLOPs of the recorded ops, with each tensor's shape given by ``shape_of((shape, axes))``
    (the traced shape by default; the planned shape to predict the cost after pruning)."""
    total = 0
    for record in records:
        if record.flop_call is None:
            continue
        packet, args, kwargs = record.flop_call
        fill = lambda v: torch.Size(shape_of(record.inputs[v.index])) if isinstance(v, Slot) else v
        args, kwargs = tree_map(fill, (args, kwargs))
        total += op_flops(packet, args, kwargs, torch.Size(shape_of(record.outputs[0])))
    return total


TracedAs = Callable[[type], type | None]  # a module class -> the subclass to trace it as, or None


@contextlib.contextmanager
def _traced_forms(model: nn.Module, traced_as: TracedAs | None):
    """Run modules whose forward the tracer cannot see into as the equivalent subclass it can
    that ``traced_as(cls)`` names (an integration's, e.g. nn.MultiheadAttention with prunable heads)."""
    swapped = [(m, type(m), form) for m in model.modules() if traced_as and (form := traced_as(type(m)))]
    try:
        for m, _, form in swapped:
            m.__class__ = form
        yield
    finally:
        for m, cls, _ in swapped:
            m.__class__ = cls


@contextlib.contextmanager
def _module_names(model: nn.Module, stack: list[str]):
    """Keep ``stack[-1]`` the qualified name of the module whose forward is running (the hooks
    are global: forwards in other threads are not ours)."""
    names = {id(m): n for n, m in model.named_modules()}
    thread = threading.get_ident()

    def enter(module, args):
        if threading.get_ident() == thread:
            stack.append(names.get(id(module), stack[-1]))

    def leave(module, args, output):
        if threading.get_ident() == thread:
            stack.pop()

    handles = [nn.modules.module.register_module_forward_pre_hook(enter),
               nn.modules.module.register_module_forward_hook(leave, always_call=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by their state-dict names, shared tensors once (under their first name)."""
    state, seen = {}, set()
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        if id(t) not in seen:
            seen.add(id(t))
            state[name] = t
    return state


@contextlib.contextmanager
def _swapped_state(model: nn.Module, replacements: dict[int, torch.Tensor]) -> Iterator[None]:
    """Hold ``replacements[id(t)]`` in place of every parameter/buffer ``t`` while the model runs,
    and the originals again afterwards, whatever happens. Each module's slot is swapped once:
    ``torch.func.functional_call`` swaps by name, so a module reachable under two names (``self.b =
    self.a``) was swapped twice and restored with the copy from the first swap."""
    swapped = []
    try:
        for module in model.modules():  # each module object once
            for table in (module._parameters, module._buffers):
                for key, t in list(table.items()):
                    if t is not None:
                        swapped.append((table, key, t))
                        table[key] = replacements[id(t)]
        yield
    finally:
        for table, key, t in reversed(swapped):
            table[key] = t


class TraceFailed(PangkasError):
    """The model's forward raised under the tracer; ``records`` holds the ops that ran before."""

    def __init__(self, message: str, records: list[OpRecord]):
        super().__init__(message)
        self.records = records


def run_traced(model: nn.Module, example_inputs, adapter: Adapter | None = None, keep_outputs: bool = True,
               traced_as: TracedAs | None = None) -> tuple[Engine, list[OpRecord], dict[str, list[torch.Tensor]]]:
    """Run ``model`` under the tracer on data-free copies of its state and ``example_inputs``;
    returns the engine, the op records and the ids given to each parameter/buffer dim (by name).
    ``adapter`` and ``traced_as`` carry the model families' knowledge (from its integrations).

    Meta tensors are tried first (fast); a model that mixes in real tensors of its own (plain
    tensor attributes) is retried under ``FakeTensorMode``, which accepts them.
    """
    try:
        return _run(model, example_inputs, None, adapter, keep_outputs, traced_as)
    except TraceFailed as meta_failure:
        if not _needs_fake(meta_failure):
            raise
        fake_log = logging.getLogger("torch._subclasses.fake_tensor")
        level = fake_log.level
        fake_log.setLevel(logging.CRITICAL)  # it logs every failing op before raising
        try:
            return _run(model, example_inputs, FakeTensorMode(allow_non_fake_inputs=True), adapter, keep_outputs,
                        traced_as)
        except TraceFailed:
            raise meta_failure from None
        finally:
            fake_log.setLevel(level)


def _needs_fake(failure: TraceFailed) -> bool:
    """Meta tensors fail where the model brings real tensors of its own or reads values."""
    cause = str(failure.__cause__).lower()
    return any(hint in cause for hint in ("device", "meta", "data-dependent", "item()"))


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off: a trace creates many small objects (records, axes),
    each batch of which made it scan the whole heap again (a third of a 70B model's trace)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _run(model, example_inputs, fake_mode: FakeTensorMode | None, adapter, keep_outputs=True, traced_as=None):
    with _collector_paused():
        return _run_unpaused(model, example_inputs, fake_mode, adapter, keep_outputs, traced_as)


def _run_unpaused(model, example_inputs, fake_mode, adapter, keep_outputs, traced_as):
    engine = Engine()
    engine.adapter = adapter
    engine.on_meta = fake_mode is None
    if fake_mode is None:
        convert = lambda t: t.detach().to("meta")  # noqa: E731
        mode = contextlib.nullcontext()
    else:
        convert = lambda t: fake_mode.from_tensor(t, static_shapes=True)  # noqa: E731
        mode = fake_mode
    originals = _state(model)
    state = {n: convert(t) for n, t in originals.items()}
    ids = {n: [engine.fresh((size,)) for size in t.shape] for n, t in state.items()}
    for name, t in state.items():
        engine.set(t, tuple(Axis((d,), i) for d, i in enumerate(ids[name])))
        engine.weights[t] = True
    inputs = tree_map(lambda t: convert(t) if isinstance(t, torch.Tensor) else t, example_inputs)
    stack = [""]
    records: list[OpRecord] = []
    tracer = _Tracer(engine, stack, records)
    try:
        with evaluating(model), mode, _traced_forms(model, traced_as), _module_names(model, stack), \
                torch.enable_grad(), _attention_scale(engine), \
                _swapped_state(model, {id(originals[n]): state[n] for n in state}), tracer:
            output = model(*_as_args(inputs), **_as_kwargs(inputs))
    except RuleError:
        raise  # strict mode: a rule's bug, not the model's
    except Exception as exc:
        raise TraceFailed(f"the model does not run on the example inputs: {type(exc).__name__}: {exc}",
                          records) from exc
    engine.where = "model output"
    if keep_outputs:
        for t in tensors(output):
            engine.block_tensor(t, "model output")
    return engine, records, ids


def _as_args(batch) -> tuple:
    if isinstance(batch, dict):
        return ()
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    return (batch,)


def _as_kwargs(batch) -> dict:
    return dict(batch) if isinstance(batch, dict) else {}


def trace(model: nn.Module, example_inputs, adapter: Adapter | None = None, keep_outputs: bool = True,
          traced_as: TracedAs | None = None) -> Coupling:
    """Trace ``model`` on ``example_inputs`` and return its channel coupling (see ``run_traced``)."""
    engine, records, tensor_ids = run_traced(model, example_inputs, adapter, keep_outputs, traced_as)
    empty = torch.zeros(0, dtype=torch.long)
    unions = (torch.cat(engine.left) if engine.left else empty, torch.cat(engine.right) if engine.right else empty)
    return Coupling(
        num_ids=engine.next_id,
        tensor_ids={name: tuple(dims) for name, dims in tensor_ids.items()},
        unions=unions,
        blocks=tuple(engine.blocks),
        approximations=tuple(engine.approximations),
        consumed=torch.cat(engine.consumed) if engine.consumed else empty,
        produced=torch.cat(engine.produced) if engine.produced else empty,
        records=tuple(records),
        on_meta=engine.on_meta,
        partitions=tuple(engine.partitions),
        at_source=torch.cat(engine.at_source) if engine.at_source else empty,
    )
