"""timm normalisations across channels, made exact to prune: weight-standardised convolutions and
ConvNeXt-V2's global response norm.

**Weight standardisation** (``StdConv2d``, ``StdConv2dSame``, ``ScaledStdConv2d``,
``ScaledStdConv2dSame``: NFNets, ResNetV2-BiT) normalises every filter of the weight over its
``fan_in = in/groups * kh * kw`` taps before convolving (timm: ``F.batch_norm`` on the weight seen
as ``(1, out, fan_in)``), then multiplies by ``gain * scale`` (scaled variants). Filters are
standardised alone, so removing output channels is exact as it is. An input channel's taps count
in every filter's mean and variance, and its standardised taps are ``-mean / std``, not 0, even
where its weights are 0: only a silenced (zero) input channel is without effect. The pruned filter
is therefore standardised with the statistics of the whole original filter: sums over its kept
taps plus the sum and sum of squares of its removed taps (``removed_moments``, an (out, 2) buffer
the cut adds and later cuts add to), over the original ``fan_in``. It computes what the dense conv
computes with those inputs silenced; gain, scale and eps are unchanged, the kept taps train.

**Global response norm** (``GlobalResponseNorm``) divides each channel's spatial L2 norm ``Gx``
by the mean of ``Gx`` over channels. Its prunable form divides the *sum* over channels by the
original channel count (``original_channels``): a channel that is zero at its input (``Gx = 0``)
changes nothing when removed. weight/bias go with their channel.

Both hold for channels that are zero where these modules read them, so their rules mark them
read across (``Engine.read_across``): the oracle silences them at their source, not only at their
consumers. Both are custom ops with their own coupling rule (``pangkas::standardised_weight``,
``pangkas::response_norm``) rather than plain ops: their sums run across the very dim that is
pruned, which the reduction rules must block in general; only these modules know how a removed
channel's share is kept. Their gradients are those of their plain maths (recomputed in backward),
so a pruned model trains. Cut modules keep their prunable subclass (their fixers below); on
loading a saved model the fixers run again and take ``fan_in`` and ``original_channels`` from the
architecture, ``removed_moments`` comes from the file. Nothing of timm is imported here.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...graph.labels import Axis
from ...graph.rules import _join, _on_dim, bind, rule
from ...surgery import Undo, cut
from ..integration import Subclasses

STD_CONV = "timm.layers.std_conv"
STD_CONVS = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")
GRN = "timm.layers.grn"
MOMENTS = "removed_moments"


# -- the maths ---------------------------------------------------------------------------------

def _standardise(weight: Tensor, removed: Tensor | None, fan_in: int, eps: float) -> Tensor:
    """Each filter less its mean over ``fan_in`` taps, over its standard deviation (biased, as
    batch norm's), the taps missing from ``weight`` having the sums ``removed`` (out, 2) or 0."""
    rows = weight.reshape(weight.shape[0], -1)
    missing = fan_in - rows.shape[1]
    total = rows.sum(1) if removed is None else rows.sum(1) + removed[:, 0]
    mean = total / fan_in
    centred = rows - mean[:, None]
    squares = centred.square().sum(1) + missing * mean.square()  # the missing taps' (w - mean)^2 ...
    if removed is not None:  # ... when they are not all zero
        squares = squares + removed[:, 1] - 2 * mean * removed[:, 0]
    return (centred * torch.rsqrt(squares / fan_in + eps)[:, None]).reshape(weight.shape)


def _response(x: Tensor, channels: int, spatial: list[int], channel: int, eps: float) -> Tensor:
    """GRN's normalised response: each channel's spatial L2 norm over their mean across
    ``channels`` channels (the sum over the channels present, over ``channels``)."""
    norms = x.norm(p=2, dim=spatial, keepdim=True)
    return norms / (norms.sum(dim=channel, keepdim=True) / channels + eps)


@torch.library.custom_op("pangkas::standardised_weight", mutates_args=())
def standardised_weight(weight: Tensor, removed: Tensor | None, fan_in: int, eps: float) -> Tensor:
    """A weight-standardised conv weight (see ``_standardise``)."""
    return _standardise(weight, removed, fan_in, eps)


@torch.library.custom_op("pangkas::response_norm", mutates_args=())
def response_norm(x: Tensor, channels: int, spatial: list[int], channel: int, eps: float) -> Tensor:
    """GRN's normalised response (see ``_response``)."""
    return _response(x, channels, spatial, channel, eps)


@standardised_weight.register_fake
def _standardised_weight_shape(weight, removed, fan_in, eps):
    return torch.empty_like(weight)


@response_norm.register_fake
def _response_norm_shape(x, channels, spatial, channel, eps):
    shape = [1 if d in [s % x.ndim for s in spatial] else n for d, n in enumerate(x.shape)]
    return x.new_empty(shape)


def _recomputed_gradient(maths):
    """(backward, setup_context) giving a custom op the gradients of ``maths``, its plain form."""
    def setup_context(ctx, inputs, output):
        ctx.tensor_at = [isinstance(a, Tensor) for a in inputs]
        ctx.constants = [None if isinstance(a, Tensor) else a for a in inputs]
        ctx.save_for_backward(*[a for a in inputs if isinstance(a, Tensor)])

    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        args = [next(saved).detach().requires_grad_(wants) if is_tensor else constant
                for is_tensor, constant, wants in zip(ctx.tensor_at, ctx.constants, ctx.needs_input_grad)]
        wanted = [a for a in args if isinstance(a, Tensor) and a.requires_grad]
        with torch.enable_grad():
            grads = iter(torch.autograd.grad(maths(*args), wanted, grad, allow_unused=True))
        return tuple(next(grads) if isinstance(a, Tensor) and a.requires_grad else None for a in args)

    return backward, setup_context


for _op, _maths in ((standardised_weight, _standardise), (response_norm, _response)):
    _backward, _setup = _recomputed_gradient(_maths)
    _op.register_autograd(_backward, setup_context=_setup)


# -- the coupling rules ------------------------------------------------------------------------

def _per_dim(e, t: Tensor) -> dict[int, Tensor] | None:
    """``t``'s ids by dim, or None if some labelled axis spans several dims."""
    axes = e.get(t)
    if any(len(ax.dims) != 1 for ax in axes):
        return None
    return {ax.dims[0]: ax.ids for ax in axes}


@rule(torch.ops.pangkas.standardised_weight)
def standardised_weight_rule(e, func, args, kwargs, out):
    """Every tap stays where it is; each filter's statistics are its own (with the removed taps'
    moments: input channels leave exactly), so the moments go with their filter. A removed
    input's standardised taps are not zero (they are ``-mean / std``, not 0, even where the weight
    is): only a silenced input removes them, so its channels are read across."""
    b = bind(func, args, kwargs)
    weight, removed = b["weight"], b.get("removed")
    dims = _per_dim(e, weight)
    if dims is None or 0 not in dims:
        e.block_tensor(weight, "weight standardisation of a weight without per-dim channel ids")
        e.block_tensor(removed, "weight standardisation of a weight without per-dim channel ids")
        e.set(out, ())
        return
    if removed is not None:
        moments, others = _on_dim(e.get(removed), 0)
        for ax in others:
            e.block(ax.ids, "removed taps' moments (sum, sum of squares) are not channels")
        _join(e, dims[0], None if moments is None or moments.dims != (0,) else moments.ids,
              "removed taps' moments")
    if 1 in dims:
        e.read_across(dims[1])
    e.set(out, e.get(weight))


@rule(torch.ops.pangkas.response_norm)
def response_norm_rule(e, func, args, kwargs, out):
    """The response keeps its channels; their sum over channels is exact to lose a channel only
    if it is zero here, so they are read across (the oracle silences them at their producer)."""
    b = bind(func, args, kwargs)
    x = b["x"]
    channel = b["channel"] % x.ndim
    ax, others = _on_dim(e.get(x), channel)
    for other in others:
        e.block(other.ids, "global response norm over a channel-labelled batch or spatial dim")
    if ax is None:
        e.set(out, ())
        return
    if ax.dims != (channel,):
        e.block(ax.ids, "global response norm over joint channel dims")
        e.set(out, ())
        return
    e.read_across(ax.ids)
    e.set(out, (Axis((channel,), ax.ids),))


# -- the prunable subclasses -------------------------------------------------------------------

class _StandardisedConv:
    """The forward of timm's weight-standardised convs through ``pangkas::standardised_weight``."""

    def forward(self, x):
        if getattr(self, "same_pad", False):
            x = sys.modules["timm.layers.padding"].pad_same(x, self.kernel_size, self.stride, self.dilation)
        fan_in = getattr(self, "fan_in", None) or self.weight.shape[1:].numel()
        weight = torch.ops.pangkas.standardised_weight(self.weight, self._buffers.get(MOMENTS), fan_in,
                                                       float(self.eps))
        if "gain" in self._parameters:  # (out, 1, 1, 1): its size-1 dims broadcast over the taps
            weight = weight * (self.gain * self.scale)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _ResponseNorm:
    """GRN's forward through ``pangkas::response_norm``, over ``original_channels`` channels."""

    def forward(self, x):
        channels = getattr(self, "original_channels", None) or x.shape[self.channel_dim]
        normed = torch.ops.pangkas.response_norm(x, channels, list(self.spatial_dim), self.channel_dim,
                                                 float(self.eps))
        return x + torch.addcmul(self.bias.view(self.wb_shape), self.weight.view(self.wb_shape), x * normed)


_MIXINS = {**{f"{STD_CONV}.{n}": _StandardisedConv for n in STD_CONVS}, f"{GRN}.GlobalResponseNorm": _ResponseNorm}


SUBCLASSES = Subclasses(__name__, {name: f"Prunable{name.rpartition('.')[2]}" for name in _MIXINS},
                        lambda name, base: ((_MIXINS[name],), {}))


def __getattr__(attr: str):  # unpickling a pruned model: make its class
    return SUBCLASSES.find(attr)


def traced_forms() -> dict:
    """timm class name -> the factory of the subclass the tracer runs instead."""
    return SUBCLASSES.traced_as()


# -- surgery -----------------------------------------------------------------------------------

def _timm_base(m: nn.Module) -> str | None:
    """The timm class ``m`` is (or is the prunable subclass of) among those known here."""
    return next((qualname_of(c) for c in type(m).__mro__ if qualname_of(c) in _MIXINS), None)


def qualname_of(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _before(undo: Undo, tensor: Tensor) -> Tensor | None:
    """``tensor``'s data before this surgery cut it, or None if it was not cut."""
    return next((data for t, data in undo.tensors if t is tensor), None)


def _removed_moments(before: Tensor, kept: list) -> Tensor:
    """(kept filters, 2): the sum and sum of squares of each kept filter's removed taps."""
    positions = cut(torch.arange(before.numel(), device=before.device).view(before.shape), kept)
    removed = before.flatten().clone()
    removed[positions.flatten()] = 0
    removed = removed.view(before.shape)
    if kept[0] is not None:
        removed = removed.index_select(0, kept[0].to(removed.device))
    rows = removed.reshape(removed.shape[0], -1)
    return torch.stack((rows.sum(1), rows.square().sum(1)), 1)


def _prunable(m: nn.Module, undo: Undo) -> None:
    """Make ``m`` its prunable subclass, recorded in ``undo``."""
    if not isinstance(m, _MIXINS[_timm_base(m)]):
        undo.remember(m, ("__class__",))
        m.__class__ = SUBCLASSES(_timm_base(m))


def fix_standardised_convs(model: nn.Module, undo: Undo) -> None:
    """Surgery fixer: a weight-standardised conv that lost input taps keeps the standardisation
    of its whole filters: it learns its original ``fan_in`` and adds the removed taps' moments."""
    for m in model.modules():
        if _timm_base(m) not in {f"{STD_CONV}.{n}" for n in STD_CONVS}:
            continue
        before = _before(undo, m.weight)
        if before is None or before[0].numel() == m.weight[0].numel():
            continue  # filters standardised alone: losing whole filters changes nothing
        moments = _removed_moments(before, undo.kept[id(m.weight)])
        _prunable(m, undo)
        if "fan_in" not in vars(m):
            m.fan_in = before[0].numel()
            undo.added.append((m, "fan_in"))
        held = m._buffers.get(MOMENTS)
        if held is None:
            undo.remember(m, ("_buffers",))  # the dict without the new buffer comes back
            m._buffers = {**m._buffers, MOMENTS: moments.to(m.weight.dtype)}
        else:
            if _before(undo, held) is None:
                undo.tensors.append((held, held.data))
            held.data = held.data + moments.to(held.dtype)


def fix_response_norms(model: nn.Module, undo: Undo) -> None:
    """Surgery fixer: a global response norm that lost channels keeps dividing by their original
    count (removed channels add 0 to the sum)."""
    for m in model.modules():
        if _timm_base(m) != f"{GRN}.GlobalResponseNorm":
            continue
        before = _before(undo, m.weight)
        if before is None or before.shape[0] == m.weight.shape[0]:
            continue
        _prunable(m, undo)
        if "original_channels" not in vars(m):
            m.original_channels = before.shape[0]
            undo.added.append((m, "original_channels"))
