"""``round_to="auto"``: keep, per layer, the channel count near the target that runs fastest here.

CPU kernels are faster at some widths than at others (vector lengths, blocking). For a group whose
target is to keep ``k`` channels, candidate widths are ``k`` and the multiples of 8 and 16 up to
12.5% above it; the group's first producing convolution or Linear is timed at each width on its
traced input shape, and the fastest wins (a wider one only if more than 3% faster). Timings are
kept per machine and layer shape in memory and on disk (``latency_table``), so each is measured once.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from . import latency_table

MARGIN = 0.125
MIN_GAIN = 0.03


def candidates(keep: int, size: int) -> list[int]:
    top = min(size, int(keep * (1 + MARGIN)))
    widths = {keep} | {w for step in (8, 16) for w in range(-(-keep // step) * step, top + 1, step)}
    return sorted(w for w in widths if keep <= w <= size)


def _seconds(kind: str, in_features: int, width: int, shape: tuple, conv: tuple) -> float:
    key = json.dumps([kind, in_features, width, shape, conv])
    return latency_table.table().seconds(key, lambda: _measure(kind, in_features, width, shape, conv))


def _measure(kind: str, in_features: int, width: int, shape: tuple, conv: tuple) -> float:
    from .measure import time_forward

    if kind == "conv":
        kernel, stride, padding, dilation = conv
        layer = nn.Conv2d(in_features, width, kernel, stride, padding, dilation)
    else:
        layer = nn.Linear(in_features, width)
    return time_forward(layer, torch.randn(shape), min_run_time=0.05)


def layer_timer(module: nn.Module, input_shape: tuple[int, ...]):
    """``width -> seconds`` for ``module`` producing ``width`` outputs, or None if not timeable
    (grouped or 1d/3d convolutions, other layer types)."""
    if isinstance(module, nn.Conv2d) and module.groups == 1 and len(input_shape) == 4:
        conv = (module.kernel_size, module.stride, module.padding, module.dilation)
        return lambda w: _seconds("conv", module.in_channels, w, tuple(input_shape), conv)
    if isinstance(module, nn.Linear):
        return lambda w: _seconds("linear", module.in_features, w, tuple(input_shape), ())
    return None


def fastest(keep: int, size: int, timer) -> int:
    """The width in ``candidates(keep, size)`` that ``timer`` finds fastest, preferring fewer."""
    best, best_time = keep, timer(keep)
    for width in candidates(keep, size)[1:]:
        t = timer(width)
        if t < best_time * (1 - MIN_GAIN):
            best, best_time = width, t
    return best
