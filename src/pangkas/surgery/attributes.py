"""After tensors shrink, module attributes that mirror their sizes must follow.

One updater per module type: torch's own modules here, other families' in their integration
(passed in). A module type without one keeps its attributes, and if its forward relied on them
the post-surgery shape check fails and the channels are kept.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

Updater = Callable[[nn.Module, dict], None]
UPDATERS: dict[type, Updater] = {}


def updater(*types: type):
    def register(fn):
        for t in types:
            UPDATERS[t] = fn
        return fn
    return register


def update(module: nn.Module, original: dict,
           updater_for: Callable[[type], Updater | None] | None = None) -> None:
    """Refresh ``module``'s size attributes; ``original`` holds their values before surgery.
    ``updater_for(cls)``: the integrations' updater for a class, asked before torch's own."""
    for cls in type(module).__mro__:
        fn = (updater_for(cls) if updater_for else None) or UPDATERS.get(cls)
        if fn is not None:
            fn(module, original)
            return


# Every updater changes only these (integrations' too: GPT-2's nf/nx), so undo can restore them.
SIZE_ATTRIBUTES = ("in_channels", "out_channels", "groups", "in_features", "out_features",
                   "num_features", "normalized_shape", "num_channels", "num_parameters",
                   "embedding_dim", "embed_dim", "kdim", "vdim", "head_dim", "nf", "nx",
                   "input_size", "hidden_size", "proj_size")


def snapshot(module: nn.Module) -> dict:
    """The size attributes an updater may change, for restoring and for reading old sizes."""
    return {n: vars(module)[n] for n in SIZE_ATTRIBUTES if n in vars(module)}


@updater(nn.modules.conv._ConvNd)
def _conv(m, original):
    w = m.weight
    if m.transposed:
        in_ch, per_group_out = w.shape[0], w.shape[1]
        m.in_channels, m.out_channels = in_ch, per_group_out * m.groups
        return
    out_ch, per_group_in = w.shape[0], w.shape[1]
    if original["groups"] > 1 and original["in_channels"] == original["groups"]:
        # depthwise: groups leave with their input channel
        m.groups = out_ch // (original["out_channels"] // original["groups"])
    m.out_channels, m.in_channels = out_ch, per_group_in * m.groups


@updater(nn.Linear)
def _linear(m, original):
    m.out_features, m.in_features = m.weight.shape


@updater(nn.modules.batchnorm._NormBase)
def _norm(m, original):
    source = m.weight if m.weight is not None else m.running_mean
    if source is not None:
        m.num_features = source.shape[0]


@updater(nn.LayerNorm)
def _layer_norm(m, original):
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


@updater(nn.GroupNorm)
def _group_norm(m, original):
    if m.weight is not None:
        m.num_channels = m.weight.shape[0]


@updater(nn.PReLU)
def _prelu(m, original):
    m.num_parameters = m.weight.shape[0]


@updater(nn.Embedding)
def _embedding(m, original):
    m.embedding_dim = m.weight.shape[1]
