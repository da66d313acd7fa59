"""One coupling rule per ATen op kind.

A rule sees an op's (fake) inputs and outputs as the tracer runs them, gives the outputs their
channel axes and records which ids must be removed together (unions) and which must never be
removed (blocks). An op without a rule blocks every channel flowing into it: nothing is ever
assumed harmless. Rules are keyed by op packet (``aten.add``) or, for the many element-wise ops,
by PyTorch's own ``pointwise`` tag. In-place (``gelu_``), ``out=`` and ``*_copy`` forms use their
functional op's rule, found from the ATen schema (``Derived``), never listed one by one.

A rule that raises on some call keeps the channels of that op (an unforeseen call prunes less
rather than failing). In strict mode (``strict()``, or ``PANGKAS_STRICT_RULES=1``; the test suite
runs in it) the exception propagates as ``RuleError`` instead, so a buggy rule fails loudly.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

import torch

from ..errors import PangkasError
from ..outputs import tensors
from .labels import Axis

aten = torch.ops.aten
Rule = Callable[..., None]
RULES: dict[object, Rule] = {}
STRICT_ENV = "PANGKAS_STRICT_RULES"
_strict: bool | None = None  # set by strict(); None: the environment decides


def rule(*packets):
    """Register the decorated function as the coupling rule of ``packets`` (``aten.add``, ...).
    An op has one rule: registering a second one for it is refused."""
    def register(fn: Rule) -> Rule:
        taken = [p for p in packets if p in RULES]
        repeated = {p for p in packets if packets.count(p) > 1}
        if taken or repeated:
            owners = ", ".join(f"{p} (by {RULES[p].__name__})" for p in taken)
            raise PangkasError(f"cannot register coupling rule {fn.__name__}: "
                               + (f"a rule is already registered for {owners}" if taken else
                                  f"{', '.join(map(str, repeated))} listed twice"))
        for packet in packets:
            RULES[packet] = fn
        return fn
    return register


class RuleError(RuntimeError):
    """A coupling rule raised while following an op (strict mode): a bug in the rule."""


@contextlib.contextmanager
def strict(on: bool = True) -> Iterator[None]:
    """Within this block, an exception inside a rule propagates as ``RuleError`` (``on=True``) or
    keeps that op's channels (``on=False``), whatever ``PANGKAS_STRICT_RULES`` says."""
    global _strict
    before, _strict = _strict, bool(on)
    try:
        yield
    finally:
        _strict = before


def is_strict() -> bool:
    """Whether a rule's exception propagates now: as ``strict()`` set, else as the environment says."""
    if _strict is not None:
        return _strict
    return os.environ.get(STRICT_ENV, "").strip() not in ("", "0")


def find_rule(func) -> Rule | None:
    """The rule of ``func``: for an ``out=`` form, or an in-place or ``*_copy`` form without a rule
    of its own, its functional form's (see ``Derived``); else its packet's; else ``pointwise`` for
    ops tagged element-wise."""
    found = RULES.get(func.overloadpacket)
    form = functional_form(func)
    if form is not None and (found is None or form[1] == "out"):
        return Derived(func, *form) if find_rule(form[0]) is not None else None
    if found is None and torch.Tag.pointwise in func.tags:
        return pointwise
    return found


# -- forms derived from a functional op ------------------------------------------------------

def _signature(func) -> list[tuple[str, str]]:
    """Names and types of the non-``out`` arguments (alias annotations left out)."""
    return [(a.name, str(a.type)) for a in func._schema.arguments if not a.is_out]


def _overload_like(packet, func):
    """The overload of ``packet`` that mutates nothing and takes ``func``'s non-``out`` arguments."""
    if packet is None:
        return None
    wanted = _signature(func)
    for name in packet.overloads():
        candidate = getattr(packet, name)
        if not candidate._schema.is_mutable and _signature(candidate) == wanted:
            return candidate
    return None


def _writes_self(func) -> bool:
    arguments = func._schema.arguments
    return bool(arguments) and arguments[0].alias_info is not None and arguments[0].alias_info.is_write


@functools.cache
def functional_form(func):
    """``(functional overload, kind)`` for a form whose channels behave as a functional op's, or None.

    The ATen schema says which: ``out=`` overloads (arguments marked out) write the functional
    result into their out tensors; ``foo_`` writes ``foo``'s result into ``self``; ``foo_copy``
    (tagged view_copy) returns a copy of the view ``foo``."""
    schema = func._schema
    namespace = getattr(torch.ops, func.namespace)
    name = func.overloadpacket.__name__
    if any(a.is_out for a in schema.arguments):
        found, kind = _overload_like(func.overloadpacket, func), "out"
    elif name.endswith("_") and not name.endswith("__") and _writes_self(func):
        found, kind = _overload_like(getattr(namespace, name[:-1], None), func), "in-place"
    elif torch.Tag.view_copy in func.tags and name.endswith("_copy"):
        found, kind = _overload_like(getattr(namespace, name[:-len("_copy")], None), func), "copy"
    else:
        return None
    if found is None or (torch.Tag.inplace_view in func.tags and func.overloadpacket not in SHAPE_BEFORE):
        return None  # an in-place view whose earlier shape cannot be told: its channels stay
    return found, kind


def _swap(shape: list[int], a: int, b: int) -> list[int]:
    shape[a], shape[b] = shape[b], shape[a]
    return shape


def _without(shape: list[int], dim: int) -> list[int]:
    del shape[dim]
    return shape


# In-place view ops have already changed ``self``'s shape when their rule runs: the shape before,
# from the shape after and the arguments. (squeeze_ cannot be undone: which size-1 dims went?)
SHAPE_BEFORE = {
    aten.transpose_: lambda shape, args: _swap(shape, norm_dim(args[1], len(shape)), norm_dim(args[2], len(shape))),
    aten.t_: lambda shape, args: shape[::-1],
    aten.unsqueeze_: lambda shape, args: _without(shape, norm_dim(args[1], len(shape))),
    aten.detach_: lambda shape, args: shape,
}


class Derived:
    """The rule of an in-place, ``out=`` or ``*_copy`` form: its functional form's rule, run on
    stand-ins for the tensors the form writes, whose labels those tensors then take.

    Stand-ins because an in-place op returns its input: a rule must not see it relabelled half-way
    (``addmm_`` reads its bias after labelling its output)."""

    def __init__(self, func, functional, kind: str):
        self.functional, self.kind = functional, kind
        self.__name__ = f"{find_rule(functional).__name__} ({kind} form of {functional})"

    def __call__(self, e, func, args, kwargs, out):
        written, args, kwargs = self._written_and_read(e, func, args, kwargs, out)
        stand_ins = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in written]
        find_rule(self.functional)(e, self.functional, args, kwargs, self._returned(stand_ins))
        for t, stand_in in zip(written, stand_ins):
            e.set(t, e.get(stand_in))

    def _written_and_read(self, e, func, args, kwargs, out):
        """(the tensors the form writes, in the functional op's return order; the args and kwargs
        the functional op takes)."""
        arguments = func._schema.arguments
        if self.kind == "out":
            names = [a.name for a in arguments if a.is_out]  # kwarg-only in every ATen schema
            written = tensors([kwargs[n] for n in names if n in kwargs])
            return written, args, {k: v for k, v in kwargs.items() if k not in names}
        if self.kind == "in-place":
            return [bind(func, args, kwargs)[arguments[0].name]], self._as_before(e, func, args), kwargs
        return tensors(out), args, kwargs

    @staticmethod
    def _as_before(e, func, args):
        """``args`` with ``self`` as the rule expects it: before an in-place view op reshaped it."""
        before = SHAPE_BEFORE.get(func.overloadpacket)
        if before is None:
            return args
        x = args[0]
        earlier = torch.empty(before(list(x.shape), args), dtype=x.dtype, device="meta")
        e.set(earlier, e.get(x))
        if e.is_weight(x):
            e.weights[earlier] = True
        return (earlier, *args[1:])

    def _returned(self, stand_ins: list[torch.Tensor]):
        """The stand-ins as the functional op returns: one tensor, a list, or a tuple."""
        returns = self.functional._schema.returns
        if len(returns) == 1 and str(returns[0].type) == "Tensor":
            return stand_ins[0]
        return list(stand_ins) if len(returns) == 1 else tuple(stand_ins)


def bind(func, args, kwargs) -> dict:
    """The op's arguments by schema name (defaults are left out: use ``.get``)."""
    names = [a.name for a in func._schema.arguments]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


# -- element-wise ----------------------------------------------------------------------------

def merge(e, inputs: list[torch.Tensor], shape: torch.Size) -> tuple[Axis, ...]:
    """Broadcast the inputs' axes to ``shape``, joining ids that meet at the same position.

    A labelled dim that broadcasts (size 1) loses its meaning and is blocked; an input that is
    full-size but unlabelled on a labelled dim (a constant, a buffer created in forward) blocks it.
    """
    nd = len(shape)
    mapped: list[Axis] = []
    covered: list[set[int]] = []
    for t in inputs:
        offset = nd - t.ndim
        seen = set()
        for ax in e.get(t):
            if any(t.shape[d] == 1 and shape[d + offset] != 1 for d in ax.dims):
                e.block(ax.ids, "broadcast of a channel dim")
                continue
            mapped.append(Axis(tuple(d + offset for d in ax.dims), ax.ids))
            seen.update(d + offset for d in ax.dims)
        covered.append(seen)
    # Axes sharing a dim merge into one axis over the union of their dims.
    groups: list[list[Axis]] = []
    for ax in mapped:
        touching = [g for g in groups if any(set(a.dims) & set(ax.dims) for a in g)]
        for g in touching:
            groups.remove(g)
        groups.append([ax] + [a for g in touching for a in g])
    sizes = dict(enumerate(shape))
    result = []
    for group in groups:
        dims = tuple(sorted({d for ax in group for d in ax.dims}))
        base = group[0].over(dims, sizes)
        for other in group[1:]:
            e.union(base, other.over(dims, sizes))
        result.append(Axis(dims, base.contiguous()))
    for t, seen in zip(inputs, covered):
        offset = nd - t.ndim
        for ax in result:
            if any(d not in seen and d - offset >= 0 and t.shape[d - offset] != 1 for d in ax.dims):
                e.block(ax.ids, "combined with an unlabelled tensor")
    return tuple(result)


# Element-wise ops that lack PyTorch's pointwise tag (the tagged ones need no entry).
@rule(aten.hardswish, aten.log_sigmoid_forward, aten.special_ndtr, aten.masked_fill, aten.rsub, aten.true_divide)
def pointwise(e, func, args, kwargs, out):
    outs = tensors(out)
    if not outs:
        return
    labels = merge(e, tensors((args, kwargs)), outs[0].shape)
    for o in outs:
        if o.shape == outs[0].shape:
            e.set(o, labels)


@rule(aten.clone, aten.alias, aten.detach, aten.lift, aten.lift_fresh, aten._to_copy, aten.lift_fresh_copy,
      aten.native_dropout)
def identity(e, func, args, kwargs, out):
    labels = e.get(args[0])
    for o in tensors(out):
        if o.shape == args[0].shape:
            e.set(o, labels)


# -- shape ops -------------------------------------------------------------------------------

def reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of ``src`` dims with runs of ``dst`` dims that hold the same elements."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        gi, gj = [], []
        pi = pj = 1
        while True:
            if i < len(src) and (pi < pj or not gi or (pi == pj and src[i] == 1 and not gj)):
                pi *= src[i]
                gi.append(i)
                i += 1
            elif j < len(dst) and (pj < pi or not gj):
                pj *= dst[j]
                gj.append(j)
                j += 1
            else:
                break
            if pi == pj and gi and gj:
                break
        while i < len(src) and src[i] == 1 and pi == pj and (j >= len(dst) or dst[j] != 1):
            gi.append(i)
            i += 1
        while j < len(dst) and dst[j] == 1 and pi == pj and (i >= len(src) or src[i] != 1):
            gj.append(j)
            j += 1
        if pi != pj:
            raise ValueError(f"cannot pair {src} with {dst}")
        groups.append((gi, gj))
    return groups


def _split(e, ids: torch.Tensor, positions: list[int], sizes: list[int]) -> tuple[torch.Tensor, list[int]]:
    """A dim split into several: code usually fixes the outer sizes (groups, heads) and derives
    the innermost (``-1``, ``C // groups``), so only the innermost non-unit dim keeps channel ids
    and may shrink. Positions along the other dims are joined (removed together) and those dims
    drop out of the axis. The post-surgery shape check catches code that differs. An adapter
    (``e.adapter``) may choose another dim: whole attention heads, in Hugging Face models.

    Returns the ids without the outer dims, and which of ``positions`` were dropped."""
    chosen = e.adapter.split_keep(e.module, sizes) if e.adapter else None
    big = [p for p, n in zip(positions, sizes) if n > 1]
    keep = positions[chosen] if chosen is not None else big[-1] if big else positions[-1]
    dropped = [p for p in positions if p != keep]
    for p in dropped:
        e.union(ids, ids.narrow(p, 0, 1).expand_as(ids))
    for p in sorted(dropped, reverse=True):
        ids = ids.select(p, 0)
    return ids, dropped


@rule(aten.view, aten._unsafe_view, aten.reshape, aten.view_copy)
def view(e, func, args, kwargs, out):
    x = args[0]
    labels = e.get(x)
    if not labels:
        return
    src, dst = tuple(x.shape), tuple(out.shape)
    groups = reshape_groups(src, dst)
    group_of = {d: g for g, (gi, _) in enumerate(groups) for d in gi}
    # Axes spanning several groups join them; each joined set is materialised and reshaped.
    sets: list[tuple[set[int], list[Axis]]] = []
    for ax in labels:
        touched = {group_of[d] for d in ax.dims}
        hit = [s for s in sets if s[0] & touched]
        for s in hit:
            sets.remove(s)
        sets.append((touched.union(*[s[0] for s in hit]), [ax] + [a for s in hit for a in s[1]]))
    result = []
    in_sizes = dict(enumerate(src))
    for touched, axes in sets:
        if len(axes) > 1:
            for ax in axes:
                e.block(ax.ids, "reshape merging two independent channel dims")
            continue
        in_dims = tuple(sorted(d for g in touched for d in groups[g][0]))
        out_dims = sorted(d for g in touched for d in groups[g][1])
        if not out_dims:
            e.block(axes[0].ids, "reshape dropping a channel dim")
            continue
        ids = axes[0].over(in_dims, in_sizes).reshape([dst[d] for d in out_dims])
        dropped = []
        for g in sorted(touched, reverse=True):
            g_out = groups[g][1]
            if len(g_out) > 1:
                positions = [out_dims.index(d) for d in g_out]
                ids, gone = _split(e, ids, positions, [dst[d] for d in g_out])
                dropped += [out_dims[p] for p in gone]
        result.append(Axis(tuple(d for d in out_dims if d not in dropped), ids))
    e.set(out, tuple(result))


def remap(e, out, labels, mapping: dict[int, int]):
    e.set(out, tuple(ax.moved(mapping) for ax in labels))


@rule(aten.permute)
def permute(e, func, args, kwargs, out):
    x, dims = args[0], [norm_dim(d, args[0].ndim) for d in args[1]]
    remap(e, out, e.get(x), {old: new for new, old in enumerate(dims)})


@rule(aten.transpose, aten.t)
def transpose(e, func, args, kwargs, out):
    x = args[0]
    a, b = (0, 1) if func.overloadpacket is aten.t or x.ndim < 2 else (
        norm_dim(args[1], x.ndim), norm_dim(args[2], x.ndim))
    mapping = {d: d for d in range(x.ndim)}
    mapping[a], mapping[b] = b, a
    remap(e, out, e.get(x), mapping)


@rule(aten.unsqueeze)
def unsqueeze(e, func, args, kwargs, out):
    x, dim = args[0], norm_dim(args[1], args[0].ndim + 1)
    remap(e, out, e.get(x), {d: d + (d >= dim) for d in range(x.ndim)})


@rule(aten.squeeze)
def squeeze(e, func, args, kwargs, out):
    x = args[0]
    if len(args) > 1:
        dims = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
        dims = {norm_dim(d, x.ndim) for d in dims if x.shape[norm_dim(d, x.ndim)] == 1}
    else:
        dims = {d for d in range(x.ndim) if x.shape[d] == 1}
    labels = e.get(x)
    for ax in labels:
        if set(ax.dims) & dims:  # a labelled dim of size 1 disappears: keep that channel
            e.block(ax.ids, "squeeze of a channel dim")
    kept = [d for d in range(x.ndim) if d not in dims]
    mapping = {d: i for i, d in enumerate(kept)}
    remap(e, out, [ax for ax in labels if not set(ax.dims) & dims], mapping)


@rule(aten.expand)
def expand(e, func, args, kwargs, out):
    x = args[0]
    offset = out.ndim - x.ndim
    labels = []
    for ax in e.get(x):
        if any(x.shape[d] == 1 and out.shape[d + offset] != 1 for d in ax.dims):
            e.block(ax.ids, "expand of a channel dim")
        else:
            labels.append(ax)
    remap(e, out, labels, {d: d + offset for d in range(x.ndim)})


@rule(aten.as_strided, aten.as_strided_)
def as_strided(e, func, args, kwargs, out):
    """A view with explicit sizes and strides may gather any elements: followed only when it moves
    none (same sizes and offset, same strides on every dim longer than 1), which is what ATen's
    adaptive_avg_pool2d does to a channels-last mean (``as_strided_``). Anything else keeps its
    channels. The in-place form is listed here: only the tracer knows self's layout before it."""
    b = bind(func, args, kwargs)
    x = b["self"]
    shape, strides, offset = e.layout_before if func.overloadpacket is aten.as_strided_ else (
        tuple(x.shape), tuple(x.stride()), x.storage_offset())
    size, stride, new_offset = list(b["size"]), list(b["stride"]), b.get("storage_offset")
    labels = e.get(x)
    if (size == list(shape) and new_offset in (None, offset)
            and all(n == 1 or a == c for n, a, c in zip(size, stride, strides))):
        e.set(out, labels)
        return
    for ax in labels:
        e.block(ax.ids, "as_strided that moves elements (strides no rule can follow)")
    e.set(out, ())


def _on_dim(labels, dim):
    """(the axis holding ``dim`` or None, the other axes)."""
    hit = [ax for ax in labels if dim in ax.dims]
    return (hit[0] if hit else None), [ax for ax in labels if dim not in ax.dims]


@rule(aten.slice)
def slice_(e, func, args, kwargs, out):
    b = bind(func, args, kwargs)
    x = b["self"]
    dim = norm_dim(b.get("dim", 0), x.ndim)
    size = x.shape[dim]
    start = b.get("start") or 0
    start = max(0, min(size, start + size if start < 0 else start))
    ax, others = _on_dim(e.get(x), dim)
    if ax is None:
        e.set(out, tuple(others))
        return
    pos = ax.dims.index(dim)
    if b.get("step", 1) != 1:
        e.block(ax.ids, "strided slice of a channel dim")
        e.set(out, tuple(others))
        return
    # Bounds are constants: a channel removed before ``start`` would shift what the slice reads
    # (a removal inside the slice changes its expected size, which the shape check verifies),
    # unless an adapter knows the bounds follow attributes it updates (a fused qkv projection).
    if not (e.adapter and e.adapter.slices_follow(e.module)):
        e.block(ax.ids.narrow(pos, 0, start), "channels before a slice start")
    e.set(out, tuple(others) + (Axis(ax.dims, ax.ids.narrow(pos, start, out.shape[dim])),))


@rule(aten.index)
def index(e, func, args, kwargs, out):
    """``x[idx]``: one index tensor gathers along dim 0 (a relative-position table); the other
    dims pass through. Anything else blocks."""
    x, indices = args[0], list(args[1])
    labels = e.get(x)
    for i in indices:  # positions, not data: they cannot lose entries
        for ax in e.get(i) if i is not None else ():
            e.block(ax.ids, "index values")
    if len(indices) != 1 or indices[0] is None:
        for ax in labels:
            e.block(ax.ids, "advanced indexing")
        return
    ax, others = _on_dim(labels, 0)
    if ax is not None:
        e.block(ax.ids, "indexing along a channel dim")
    shift = indices[0].ndim - 1
    remap(e, out, others, {d: d + shift for d in range(1, x.ndim)})


@rule(aten.select)
def select(e, func, args, kwargs, out):
    x, dim = args[0], norm_dim(args[1], args[0].ndim)
    ax, others = _on_dim(e.get(x), dim)
    if ax is not None:
        e.block(ax.ids, "select of one channel by index")
    remap(e, out, others, {d: d - (d > dim) for d in range(x.ndim) if d != dim})


@rule(aten.unbind)
def unbind(e, func, args, kwargs, out):
    b = bind(func, args, kwargs)
    x = b["self"]
    dim = norm_dim(b.get("dim", 0), x.ndim)
    ax, others = _on_dim(e.get(x), dim)
    if ax is not None:
        e.block(ax.ids, "unbind of a channel dim")
    for o in tensors(out):
        remap(e, o, others, {d: d - (d > dim) for d in range(x.ndim) if d != dim})


@rule(aten.split, aten.split_with_sizes, aten.unsafe_split, aten.unsafe_split_with_sizes)
def split(e, func, args, kwargs, out):
    b = bind(func, args, kwargs)
    x = b["self"]
    dim = norm_dim(b.get("dim", 0), x.ndim)
    pieces = tensors(out)
    ax, others = _on_dim(e.get(x), dim)
    if ax is None:
        for o in pieces:
            e.set(o, tuple(others))
        return
    pos = ax.dims.index(dim)
    sizes = [o.shape[dim] for o in pieces]
    chunks = ax.ids.split(sizes, pos)
    # Sizes held in attributes an integration recomputes from the cut (``e.adapter``): each piece
    # loses channels of its own. Constant sizes: equal pieces (chunk) lose the same offsets, so
    # the cuts stay where the code puts them; unequal ones cannot follow a cut.
    if not (e.adapter and e.adapter.splits_follow(e.module)):
        if len(set(sizes)) != 1:
            e.block(ax.ids, "split into unequal pieces")
            for o in pieces:
                e.set(o, tuple(others))
            return
        for c in chunks[1:]:
            e.union(chunks[0], c)
    for o, c in zip(pieces, chunks):
        e.set(o, tuple(others) + (Axis(ax.dims, c),))


@rule(aten.cat)
def cat(e, func, args, kwargs, out):
    b = bind(func, args, kwargs)
    inputs = [t for t in b["tensors"] if t.ndim == out.ndim]  # legacy: empty 1-d tensors skipped
    dim = norm_dim(b.get("dim", 0), out.ndim)
    along, rest = [], []
    for t in inputs:
        ax, others = _on_dim(e.get(t), dim)
        if ax is not None and len(ax.dims) > 1:
            e.block(ax.ids, "concat along a joint channel dim")
            ax = None
        along.append(ax)
        rest.append({o.dims: o.ids for o in others})
    labels = []
    # Other dims line up element-wise across the inputs.
    for dims in {d for r in rest for d in r}:
        present = [r[dims] for r in rest if dims in r]
        if len(present) != len(inputs):
            for ids in present:
                e.block(ids, "concat with an input unlabelled on a channel dim")
            continue
        for ids in present[1:]:
            e.union(present[0], ids)
        labels.append(Axis(dims, present[0]))
    if any(a is not None for a in along):
        ids = torch.cat([a.ids if a is not None else e.fixed(t.shape[dim]) for a, t in zip(along, inputs)])
        labels.append(Axis((dim,), ids))
    e.set(out, tuple(labels))


@rule(aten.stack)
def stack(e, func, args, kwargs, out):
    b = bind(func, args, kwargs)
    inputs = list(b["tensors"])
    dim = norm_dim(b.get("dim", 0), out.ndim)
    labels = merge(e, inputs, inputs[0].shape)
    remap(e, out, labels, {d: d + (d >= dim) for d in range(inputs[0].ndim)})


@rule(aten.repeat)
def repeat(e, func, args, kwargs, out):
    x, reps = args[0], list(args[1])
    offset = len(reps) - x.ndim
    # Tiles share ids: a removed channel goes from every tile, so the tiles stay equal.
    labels = [Axis(tuple(d + offset for d in ax.dims), ax.ids.repeat(*[reps[d + offset] for d in ax.dims]))
              for ax in e.get(x)]
    e.set(out, tuple(labels))


@rule(aten.roll, aten.flip)
def roll(e, func, args, kwargs, out):
    b = bind(func, args, kwargs)
    x = b["self"]
    dims = b.get("dims") or range(x.ndim)
    moved = {norm_dim(d, x.ndim) for d in dims}
    labels = e.get(x)
    for ax in labels:
        if set(ax.dims) & moved:
            e.block(ax.ids, f"{func.overloadpacket.__name__} along a channel dim")
    e.set(out, tuple(ax for ax in labels if not set(ax.dims) & moved))


@rule(aten.unfold)
def unfold(e, func, args, kwargs, out):
    """Sliding windows along one dim, the window appended as a new last dim: other dims keep their
    positions (each channel is windowed alone); windows along a channel dim would shift."""
    x, dim = args[0], norm_dim(args[1], max(args[0].ndim, 1))
    ax, others = _on_dim(e.get(x), dim)
    if ax is not None:
        e.block(ax.ids, "unfold along a channel dim")
    e.set(out, tuple(others))


@rule(aten.constant_pad_nd)
def pad(e, func, args, kwargs, out):
    x, amounts = args[0], list(args[1])
    padded = {x.ndim - 1 - k: (amounts[2 * k], amounts[2 * k + 1]) for k in range(len(amounts) // 2)}
    labels = []
    for ax in e.get(x):
        ids = ax.ids
        for d in set(ax.dims) & set(padded):
            before, after = padded[d]
            if before < 0 or after < 0:
                e.block(ax.ids, "cropping a channel dim")
                break
            # Padded positions get id FIXED (0): they stay; the real channels may go.
            pos = ax.dims.index(d)
            ids = torch.nn.functional.pad(ids.movedim(pos, -1), (before, after)).movedim(-1, pos)
        else:
            labels.append(Axis(ax.dims, ids))
    e.set(out, tuple(labels))


@rule(aten.pixel_shuffle, aten.pixel_unshuffle)
def pixel_shuffle(e, func, args, kwargs, out):
    """Channels trade with r x r blocks of pixels. pixel_shuffle: output channel c is input
    channels c*r*r .. c*r*r+r*r-1, so those go together; pixel_unshuffle: input channel c becomes
    output channels c*r*r .. c*r*r+r*r-1, which carry its id. Whole blocks keep the mapping exact."""
    x, r = args[0], args[1]
    channel = x.ndim - 3
    _regroup(e, func, x, out, channel, channel, r * r, func.overloadpacket is aten.pixel_shuffle)


@rule(aten.im2col, aten.col2im)
def im2col(e, func, args, kwargs, out):
    """F.unfold (im2col): channel c becomes rows c*k .. c*k+k-1 (k kernel taps), which carry its id;
    F.fold (col2im): those rows sum into channel c, so they go together. Labelled spatial dims block."""
    x = args[0]
    taps = args[1 if func.overloadpacket is aten.im2col else 2]
    k = taps[0] * taps[1]
    folding = func.overloadpacket is aten.col2im
    channel, out_channel = (x.ndim - 2, out.ndim - 3) if folding else (x.ndim - 3, out.ndim - 2)
    _regroup(e, func, x, out, channel, out_channel, k, folding)


def _regroup(e, func, x, out, channel: int, out_channel: int, size: int, merging: bool) -> None:
    """Labels of an op that trades a channel dim with the spatial dims after it, ``size`` to one:
    each channel becomes (or ``merging``: is made of) a block of ``size`` channels. Labelled
    spatial dims and joint channel dims block."""
    ax, others = _on_dim(e.get(x), channel)
    labels = []
    for other in others:
        if max(other.dims) > channel:
            e.block(other.ids, f"{func.overloadpacket.__name__} of a channel-labelled spatial dim")
        else:
            labels.append(other)
    if ax is not None and ax.dims != (channel,):
        e.block(ax.ids, f"{func.overloadpacket.__name__} of joint channel dims")
    elif ax is not None:
        labels.append(Axis((out_channel,), _pixel_blocks(e, ax.ids, size, merging)))
    e.set(out, tuple(labels))


def _pixel_blocks(e, ids: torch.Tensor, block: int, shuffle: bool) -> torch.Tensor:
    """The output channel ids of a pixel (un)shuffle with ``block`` = r*r sub-pixels."""
    if not shuffle:
        return ids.repeat_interleave(block)
    grid = ids.reshape(-1, block)
    for k in range(1, block):
        e.union(grid[:, 0], grid[:, k])
    return grid[:, 0].contiguous()


@rule(aten.channel_shuffle, aten.native_channel_shuffle)
def channel_shuffle(e, func, args, kwargs, out):
    """Channels viewed as (groups, n), transposed, flattened: offset j of every group goes
    together (so each group keeps the same offsets and the shuffle stays a shuffle)."""
    x, groups = args[0], args[1]
    ax, others = _on_dim(e.get(x), 1)
    if ax is not None and ax.dims != (1,):
        e.block(ax.ids, "channel shuffle of joint channel dims")
        ax = None
    if ax is None:
        e.set(out, tuple(others))
        return
    grid = ax.ids.reshape(groups, -1)
    for g in range(1, groups):
        e.union(grid[0], grid[g])
    e.set(out, tuple(others) + (Axis((1,), grid.t().reshape(-1)),))


@rule(aten.glu)
def glu(e, func, args, kwargs, out):
    """``a * sigmoid(b)`` of the two halves along ``dim``: position i of both halves goes together."""
    x = args[0]
    dim = norm_dim(args[1] if len(args) > 1 else -1, x.ndim)
    ax, others = _on_dim(e.get(x), dim)
    if ax is not None and ax.dims != (dim,):
        e.block(ax.ids, "glu over joint channel dims")
        ax = None
    if ax is None:
        e.set(out, tuple(others))
        return
    first, second = ax.ids.chunk(2)
    e.union(first, second)
    e.set(out, tuple(others) + (Axis((dim,), first.contiguous()),))


# -- reductions ------------------------------------------------------------------------------

def _reduce(e, x, out, dims, keepdim, what: str, approximate: bool):
    dims = set(range(x.ndim)) if not dims else {norm_dim(d, x.ndim) for d in dims}
    labels = []
    for ax in e.get(x):
        if set(ax.dims) & dims:
            (e.approximate if approximate else e.block)(ax.ids, f"{what} across channels")
        else:
            labels.append(ax)
    if keepdim:
        e.set(out, tuple(labels))
    else:
        kept = [d for d in range(x.ndim) if d not in dims]
        remap(e, out, labels, {d: i for i, d in enumerate(kept)})


@rule(aten.mean, aten.var, aten.std, aten.var_mean, aten.std_mean, aten.sum, aten.amax, aten.amin,
      aten.max, aten.min, aten.prod, aten.linalg_vector_norm, aten.norm, aten.logsumexp,
      aten.argmax, aten.argmin, aten.all, aten.any)
def reduction(e, func, args, kwargs, out):
    """Statistics across channels (mean, var: what normalisations compute) are approximate under
    removal; other reductions across channels (sum, max, ...) block."""
    b = bind(func, args, kwargs)
    x = b["self"]
    dims = b.get("dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    keepdim = b.get("keepdim", False)
    statistic = func.overloadpacket in (aten.mean, aten.var, aten.std, aten.var_mean, aten.std_mean)
    for o in tensors(out):
        _reduce(e, x, o, dims, keepdim, func.overloadpacket.__name__, approximate=statistic)


@rule(aten._softmax, aten._log_softmax, aten.softmax, aten.log_softmax, aten._safe_softmax, aten.cumsum)
def along_dim(e, func, args, kwargs, out):
    x, dim = args[0], norm_dim(args[1], args[0].ndim)
    labels = e.get(x)
    for ax in labels:
        if dim in ax.dims:
            e.block(ax.ids, f"{func.overloadpacket.__name__} across channels")
    e.set(out, tuple(ax for ax in labels if dim not in ax.dims))


# -- per-channel spatial ops (pooling, resizing, spatial padding) ----------------------------

@rule(aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.max_pool2d_with_indices,
      aten.max_pool3d_with_indices, aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d,
      aten._adaptive_avg_pool2d, aten._adaptive_avg_pool3d, aten.adaptive_avg_pool1d,
      aten.adaptive_max_pool2d, aten.adaptive_max_pool1d, aten.adaptive_max_pool3d,
      aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d,
      aten.upsample_bilinear2d, aten.upsample_bicubic2d, aten.upsample_linear1d,
      aten._upsample_nearest_exact2d, aten._upsample_bilinear2d_aa, aten.reflection_pad2d,
      aten.replication_pad2d, aten.reflection_pad1d, aten.replication_pad1d)
def spatial(e, func, args, kwargs, out):
    """Each channel's trailing spatial dims (1, 2 or 3, from the op's name) are processed alone."""
    x = args[0]
    name = func.overloadpacket.__name__
    rank = 3 if "3d" in name else 1 if "1d" in name else 2
    spatial_dims = set(range(x.ndim - rank, x.ndim))
    labels = []
    for ax in e.get(x):
        if set(ax.dims) & spatial_dims:
            e.block(ax.ids, f"{name} over a channel dim")
        else:
            labels.append(ax)
    for o in tensors(out):
        e.set(o, tuple(labels))


# -- linear algebra --------------------------------------------------------------------------

def _to_layout(ax: Axis, layout: list[int], sizes: list[int]) -> torch.Tensor:
    """Ids of ``ax`` (dims within ``layout``) as an array in ``layout``'s order, broadcast."""
    order = sorted(ax.dims, key=layout.index)
    ids = ax.ids.permute([ax.dims.index(d) for d in order]) if len(order) > 1 else ax.ids
    shape = [sizes[i] if d in ax.dims else 1 for i, d in enumerate(layout)]
    return ids.reshape(shape).expand(sizes)


def contract(e, a, b, out, batch: int):
    """``out = a @ b`` over the last two dims with ``batch`` leading batch dims.

    Batch dims line up element-wise; the contracted dim ``k`` joins both sides' ids (a channel
    removed from one side is removed from the other, which is exact: its term vanishes); each
    side's free dim carries its ids to the output."""
    layout_a = list(range(batch)) + [batch + 1]   # a: (..., n, k)
    layout_b = list(range(batch)) + [batch]       # b: (..., k, m)
    sizes = [a.shape[d] for d in layout_a]
    joined, free, keys = [], [], []
    for t, layout, free_dim, out_dim in ((a, layout_a, batch, batch), (b, layout_b, batch + 1, batch + 1)):
        for ax in e.get(t):
            dims = set(ax.dims)
            if dims <= set(layout):
                joined.append((t, _to_layout(ax, layout, sizes)))
                keys.append(frozenset(layout.index(d) for d in dims))
            elif dims == {free_dim}:
                free.append(Axis((out_dim,), ax.ids))
                e.produce(ax.ids)
            else:
                e.block(ax.ids, "channel dims mixed across a matrix product")
    # Per set of layout dims (heads on a batch dim; the contracted dim): both sides' ids join.
    # A set that only one side carries meets a constant or model input there: those stay.
    arrays = []
    for key in set(keys):
        own = [(t, ids) for (t, ids), k in zip(joined, keys) if k == key]
        if len({id(t) for t, _ in own}) == 1 and a is not b:
            for _, ids in own:
                e.block(ids, "matrix product with an unlabelled operand")
            continue
        for _, ids in own[1:]:
            e.union(own[0][1], ids)
        arrays += [ids for _, ids in own]
    for t, ids in joined:
        if e.is_weight(t):  # a weight reading channels; activation x activation reads none
            e.consume(ids)
    kept = {id(ids) for ids in arrays}
    contracted = [ids for (t, ids), key in zip(joined, keys) if len(layout_a) - 1 in key and id(ids) in kept]
    if contracted and not e.is_weight(a) and not e.is_weight(b):
        # Two activations meeting over channels: attention scores, whose scale code usually
        # derives from head_dim at run time (q.shape[-1] ** -0.5), invisible to a trace.
        # (Whole heads, on a batch dim, keep head_dim and the scale: those stay exact.)
        e.approximate(contracted[0], "attention scores over head dims (scale may follow head_dim)")
    # Ids on batch dims only (not the contracted dim) survive into the output.
    batch_labels = []
    for t, layout in ((a, layout_a), (b, layout_b)):
        for ax in e.get(t):
            if set(ax.dims) <= set(range(batch)):
                batch_labels.append(ax)
    e.set(out, tuple(batch_labels[:1]) + tuple(free))


@rule(aten.mm)
def mm(e, func, args, kwargs, out):
    contract(e, args[0], args[1], out, 0)


@rule(aten.bmm)
def bmm(e, func, args, kwargs, out):
    contract(e, args[0], args[1], out, 1)


@rule(aten.addmm, aten.baddbmm)
def addmm(e, func, args, kwargs, out):
    bias, a, b = args[0], args[1], args[2]
    contract(e, a, b, out, 0 if func.overloadpacket is aten.addmm else 1)
    e.set(out, merge(e, [out, bias], out.shape))


# -- layers ----------------------------------------------------------------------------------

def _join(e, x_ids, p_ids, what, consumes: bool = False):
    """Tie an activation's channel ids to a parameter dim aligned with them; ``consumes`` marks
    the parameter dim as reading the channels (a weight's input dim)."""
    if p_ids is None and x_ids is None:
        return
    if p_ids is None:
        e.block(x_ids, f"{what}: parameter not traceable")
    elif x_ids is None:
        e.block(p_ids, f"{what} is unlabelled (a model input or constant)")
    else:
        e.union(x_ids, p_ids)
        if consumes:
            e.consume(p_ids)


@rule(aten.convolution)
def convolution(e, func, args, kwargs, out):
    b = bind(func, args, kwargs)
    x, w, bias, transposed, groups = b["input"], b["weight"], b.get("bias"), b["transposed"], b["groups"]
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    x_ax, x_rest = _on_dim(e.get(x), 1)
    for ax in x_rest:
        e.block(ax.ids, "convolution over a channel-labelled spatial dim")
    if x_ax is not None and x_ax.dims != (1,):
        e.block(x_ax.ids, "convolution over joint channel dims")
        x_ax = None
    x_ids = None if x_ax is None else x_ax.ids
    w_axes = {ax.dims: ax.ids for ax in e.get(w)}
    for d in range(2, w.ndim):
        if (d,) in w_axes:
            e.block(w_axes[(d,)], "convolution kernel taps")
    w_in, w_out = w_axes.get((in_dim,)), w_axes.get((out_dim,))
    out_ids = w_out
    if groups == 1:
        _join(e, x_ids, w_in, "convolution input", consumes=True)
    elif not transposed and w.shape[1] == 1:
        # Depthwise (multiplier m): input channel c feeds outputs c*m..c*m+m-1 and leaves with
        # them (the group count follows); the single input tap per group is not a channel.
        if w_in is not None:
            e.block(w_in, "depthwise input tap")
        m = out.shape[1] // groups
        _join(e, None if x_ids is None else x_ids.repeat_interleave(m), w_out, "depthwise input",
              consumes=True)
    elif not transposed:
        # Grouped: each group must keep the same number of inputs and of outputs; which ones may
        # differ per group (the weight's input dim is then cut per group: ``per_row``).
        if x_ids is None or w_in is None:
            _join(e, x_ids, w_in, "grouped input")
        else:
            e.consume(w_in)
            e.partition(x_ids.reshape(groups, -1), "grouped convolution input", per_row=w_in)
        if w_out is not None:
            e.partition(w_out.reshape(groups, -1), "grouped convolution output")
    else:
        e.block_tensor(x, "grouped transposed convolution")
        e.block_tensor(w, "grouped transposed convolution")
        out_ids = None
    if bias is not None and e.get(bias):
        _join(e, out_ids, e.get(bias)[0].ids, "convolution bias")
    if out_ids is not None:
        e.produce(out_ids)
        e.set(out, (Axis((1,), out_ids),))


def _per_channel(e, x, params, dim: int, what: str, approximate: bool):
    """Parameters holding one value per channel of ``x``'s ``dim`` (norm scale/shift, stats)."""
    x_ax, rest = _on_dim(e.get(x), dim)
    if x_ax is not None and x_ax.dims != (dim,):
        e.block(x_ax.ids, f"{what} over joint channel dims")
        x_ax = None
    x_ids = None if x_ax is None else x_ax.ids
    for p in params:
        if isinstance(p, torch.Tensor) and p.ndim == 1:
            axes = e.get(p)
            _join(e, x_ids, axes[0].ids if axes else None, what)
    if approximate and x_ids is not None:
        e.approximate(x_ids, f"{what} statistics over channels")
    return x_ax, tuple(rest)


@rule(aten.native_batch_norm, aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit,
      aten._native_batch_norm_legit_functional, aten.batch_norm)
def batch_norm(e, func, args, kwargs, out):
    b = bind(func, args, kwargs)
    x = b["input"]
    params = [b.get(n) for n in ("weight", "bias", "running_mean", "running_var")]
    x_ax, rest = _per_channel(e, x, params, 1, "batch norm", approximate=False)
    outs = tensors(out)
    e.set(outs[0], rest + ((x_ax,) if x_ax is not None else ()))
    for o in outs[1:]:
        if x_ax is not None and o.ndim == 1 and o.shape[0] == x.shape[1]:
            e.set(o, (Axis((0,), x_ax.ids),))


@rule(aten.native_layer_norm, aten.layer_norm, aten.rms_norm, aten._fused_rms_norm)
def layer_norm(e, func, args, kwargs, out):
    b = bind(func, args, kwargs)
    x, shape, weight = b["input"], list(b["normalized_shape"]), b.get("weight")
    normed = set(range(x.ndim - len(shape), x.ndim))
    labels = e.get(x)
    result = tensors(out)[0]
    if len(shape) != 1:
        for ax in labels:
            if set(ax.dims) & normed:
                e.block(ax.ids, "normalisation over several dims")
        e.set(result, tuple(ax for ax in labels if not set(ax.dims) & normed))
        return
    x_ax, rest = _per_channel(e, x, [weight, b.get("bias")], x.ndim - 1, "layer norm", approximate=True)
    if x_ax is not None and weight is None:
        e.block(x_ax.ids, "layer norm without weight (normalized_shape could not follow)")
    e.set(result, rest + ((x_ax,) if x_ax is not None else ()))


@rule(aten.native_group_norm)
def group_norm(e, func, args, kwargs, out):
    b = bind(func, args, kwargs)
    x, weight = b["input"], b.get("weight")
    x_ax, rest = _per_channel(e, x, [weight, b.get("bias")], 1, "group norm", approximate=True)
    if x_ax is not None:
        e.partition(x_ax.ids.reshape(b["group"], -1), "group norm groups")  # equal channels per group
        if weight is None:
            e.block(x_ax.ids, "group norm without weight")
    e.set(tensors(out)[0], rest + ((x_ax,) if x_ax is not None else ()))


@rule(aten.embedding)
def embedding(e, func, args, kwargs, out):
    weight, indices = args[0], args[1]
    axes = {ax.dims: ax.ids for ax in e.get(weight)}
    if (0,) in axes:
        e.block(axes[(0,)], "embedding rows (vocabulary)")
    e.block_tensor(indices, "embedding indices")
    if (1,) in axes:
        e.produce(axes[(1,)])
        e.set(out, (Axis((out.ndim - 1,), axes[(1,)]),))


@rule(aten._prelu_kernel)
def prelu(e, func, args, kwargs, out):
    e.set(out, merge(e, [args[0], args[1]], out.shape))


@rule(aten._scaled_dot_product_flash_attention_for_cpu, aten.scaled_dot_product_attention,
      aten._scaled_dot_product_attention_math, aten._scaled_dot_product_efficient_attention,
      aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_cudnn_attention)
def attention(e, func, args, kwargs, out):
    """softmax(q k^T * scale) v over (..., seq, head_dim). q and k head dims are contracted
    (joined); v's head dim reaches the output. The default scale is 1/sqrt(head_dim), so removing
    q/k head dims without an explicit ``scale`` changes the result: approximate."""
    b = bind(func, args, kwargs)
    q, k, v = b["query"], b["key"], b["value"]
    nd = q.ndim
    seq = nd - 2
    layout = list(range(nd - 2)) + [nd - 1]
    sizes = [q.shape[d] for d in layout]
    arrays, head_dims = [], []
    for t in (q, k):
        for ax in e.get(t):
            if seq in ax.dims:
                e.block(ax.ids, "attention over a channel-labelled sequence dim")
            else:
                arrays.append(_to_layout(ax, layout, sizes))
                head_dims.append(nd - 1 in ax.dims)
    for ids in arrays[1:]:
        e.union(arrays[0], ids)
    if len(arrays) == 1:
        e.block(arrays[0], "attention with unlabelled query or key")
    elif any(head_dims) and b.get("scale") is None:  # whole heads (batch dims) keep head_dim
        e.approximate(arrays[0], "attention scale 1/sqrt(head_dim) follows head_dim")
    labels = []
    for ax in e.get(v):
        if seq in ax.dims:
            e.block(ax.ids, "attention over a channel-labelled sequence dim")
            continue
        labels.append(ax)
        if set(ax.dims) <= set(range(nd - 2)):  # heads: q/k head h and v head h go together
            heads = _to_layout(ax, layout, sizes)
            for ids in arrays:
                e.union(ids, heads)
    mask = b.get("attn_mask")
    if isinstance(mask, torch.Tensor):
        e.block_tensor(mask, "attention mask")
    outs = tensors(out)
    e.set(outs[0], tuple(labels))
    heads = tuple(ax for ax in labels if set(ax.dims) <= set(range(nd - 2)))
    for extra in outs[1:]:  # log-sum-exp per (batch, head, query): it follows the heads
        if extra.ndim >= nd - 2 and tuple(extra.shape[:nd - 2]) == tuple(q.shape[:nd - 2]):
            e.set(extra, heads)


@rule(aten.copy_, aten.copy)
def copy_(e, func, args, kwargs, out):
    e.set(out, merge(e, [args[0], args[1]], args[0].shape))


@rule(aten.empty_like, aten.zeros_like, aten.ones_like, aten.full_like, aten.rand_like, aten.randn_like,
      aten.fill, aten.zero)
def like(e, func, args, kwargs, out):
    """A fresh tensor shaped like the input follows the input's channels; its values are not read."""
    e.set(out, e.get(args[0]))


@rule(aten.new_zeros, aten.new_empty, aten.new_ones, aten.new_full, aten.new_empty_strided)
def new_constant(e, func, args, kwargs, out):
    """Only dtype and device are read from the input: nothing to couple or block."""


# Queries of metadata: they read no channel values.
IGNORED = {torch.ops.prim.device, aten.sym_size, aten.sym_numel, aten.sym_stride,
           aten.sym_storage_offset, aten.is_same_size, aten.is_contiguous, aten.dim}
