"""Counting multiply-accumulates: one FLOP formula per ATen op, torch's own (``flop_registry``).

Every count in pangkas goes through ``op_flops``: a real forward (``FlopCounter``, for
``measure``), the ops a trace recorded (their shapes as traced, or as planned after pruning) and
the ops each block runs (layer pruning). A MAC is two FLOPs.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, register_flop_formula


def has_formula(packet) -> bool:
    """Whether torch knows how to count ``packet`` (``aten.mm``); other ops count as zero."""
    return packet in flop_registry


def op_flops(packet, args, kwargs, out) -> int:
    """FLOPs of one call of ``packet``: its arguments and output, each tensor given as itself or
    as its shape (``torch.Size``). 0 for an op without a formula."""
    formula = flop_registry.get(packet)
    return formula(*args, **kwargs, out_val=out) if formula is not None else 0


def _rnn_layer_flops(input_shape, weight_ih_shape, weight_hh_shape, *args, out_shape=None, **kwargs) -> int:
    """One direction of one layer of oneDNN's LSTM (how CPUs run ``nn.LSTM``): both gate matrices
    multiply one vector per step and sequence."""
    steps = 1
    for size in input_shape[:-1]:
        steps *= size
    return 2 * steps * (weight_ih_shape[0] * weight_ih_shape[1] + weight_hh_shape[0] * weight_hh_shape[1])


if torch.ops.aten.mkldnn_rnn_layer not in flop_registry:  # torch has none (2.14)
    register_flop_formula(torch.ops.aten.mkldnn_rnn_layer)(_rnn_layer_flops)


def _int_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``torch._int_mm`` (int8 x int8 -> int32: how torchao's int8-dynamic Linear layers multiply):
    the same multiply-accumulates as the float ``mm`` it replaces."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


if torch.ops.aten._int_mm not in flop_registry:  # torch has none (2.14)
    register_flop_formula(torch.ops.aten._int_mm)(_int_mm_flops)


class FlopCounter(TorchDispatchMode):
    """FLOPs of every op that runs inside the block, in ``.flops``."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.flops += op_flops(func.overloadpacket, args, kwargs, out)
        return out
