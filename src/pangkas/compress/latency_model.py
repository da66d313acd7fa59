"""The search's latency estimate: each module's measured share of a forward pass on this machine,
scaled by the work the cuts leave in it.

The dense model runs a few times with every module timed (its own time, its children's
excluded); the median share of each module is kept in the on-disk latency table
(``pangkas.latency_table``: per machine, torch version, model structure and input shape), so the
profile is measured once. A state's estimated latency ratio is the sum over modules of share x
(work left / work before), the work of a module being its ops' FLOPs (or, for ops without FLOPs,
the elements they write), zero inside a removed block. It is an estimate: the compressed model is
timed for real against the dense one before any claim is made (see ``pangkas.compress``).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Mapping

import torch
from torch import nn

from .. import latency_table
from ..inputs import call_model
from ..modules import evaluating
from ..outputs import tensors

REPEATS = 5


def signature(model: nn.Module, example_inputs) -> str:
    """What a profile depends on besides the machine: the modules, their parameters' shapes and
    dtypes, and the input shapes."""
    parts = [(name, type(m).__qualname__) for name, m in model.named_modules()]
    parts += [(name, tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters()]
    parts += [(tuple(t.shape), str(t.dtype)) for t in tensors(example_inputs)]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]


@torch.no_grad()
def profile(model: nn.Module, example_inputs, repeats: int = REPEATS) -> dict[str, float]:
    """Seconds each module spends in its own code per forward pass (children excluded; a module
    called several times summed), the median of ``repeats`` passes after a warm-up."""
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[list] = []  # [name, start, children's time]
    spent: dict[str, float] = {}

    def enter(module, args):
        stack.append([names[id(module)], time.perf_counter(), 0.0])

    def leave(module, args, output):
        name, start, children = stack.pop()
        elapsed = time.perf_counter() - start
        spent[name] = spent.get(name, 0.0) + elapsed - children
        if stack:
            stack[-1][2] += elapsed

    runs = []
    handles = [m.register_forward_pre_hook(enter) for m in model.modules()]
    handles += [m.register_forward_hook(leave, always_call=True) for m in model.modules()]
    try:
        with evaluating(model):
            for i in range(repeats + 1):
                stack.clear()
                spent.clear()
                call_model(model, example_inputs)
                if i:  # the first pass warms caches and allocators
                    runs.append(dict(spent))
    finally:
        for h in handles:
            h.remove()
    return {name: statistics.median(run.get(name, 0.0) for run in runs) for name in names.values()}


class LatencyModel:
    """Each module's share of the dense model's forward time on this machine (from the on-disk
    table, or profiled now and recorded there)."""

    def __init__(self, model: nn.Module, example_inputs):
        sig = signature(model, example_inputs)
        names = [n for n, _ in model.named_modules()]
        keys = {json.dumps(["module time", sig, n]): n for n in names}

        def measure() -> dict[str, float]:
            seconds = profile(model, example_inputs)
            return {key: seconds[name] for key, name in keys.items()}

        seconds = latency_table.table().many(list(keys), measure)
        total = sum(seconds.values())
        self.shares = {name: seconds[key] / total for key, name in keys.items()}

    def ratio(self, scales: Mapping[str, float]) -> float:
        """Estimated time over the dense model's when each module's work is scaled by
        ``scales[name]`` (1.0 where not given)."""
        return sum(share * scales.get(name, 1.0) for name, share in self.shares.items())
