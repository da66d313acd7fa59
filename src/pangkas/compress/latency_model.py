"""The search's latency estimate: each module's measured share of a forward pass on this machine,
scaled by the work the cuts leave in it.

The dense model runs a few times with every module timed (its own time, its children's
excluded); the median share of each module is kept in the on-disk latency table
(``pangkas.latency_table``: per machine, torch version, model structure and input shape), so the
profile is measured once. A state's estimated latency ratio is the sum over modules of share x
(work left / work before), the work of a module being its ops' FLOPs (or, for ops without FLOPs,
the elements they write), zero inside a removed block. It is an estimate: the compressed model is
timed for real against the dense one before any claim is made (see ``pangkas.compress``).

For a result that will be quantized (``quantize=`` a ``pangkas.quantize`` scheme), the shares are
those of the quantized dense model (int8 layers take another share of the time than float ones),
and the sum is scaled by the quantized dense model's time over the float one's, timed in
interleaved rounds and kept in the table too: ratios stay relative to the float dense model, which
is what the budget and the finalists' timings refer to.
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
from ..measure import latency_ratios
from ..modules import evaluating
from ..outputs import tensors
from ..quantize import quantize as quantized

REPEATS = 5
SPEED_ROUNDS = 6  # interleaved rounds timing the quantized dense model against the float one
SPEED_RUN_TIME = 0.05  # seconds per model per round


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
    table, or profiled now and recorded there). With ``quantize`` (a scheme), the shares of the
    dense model so quantized, and ``scale`` its time over the float model's (else 1.0)."""

    def __init__(self, model: nn.Module, example_inputs, quantize: str | None = None):
        sig = signature(model, example_inputs)
        if quantize:  # the quantized model's parameters look like the float ones: the scheme tells them apart
            sig += f" {quantize}"
        timed = quantized(model, None, quantize)[0] if quantize else model
        self.shares = _shares(timed, example_inputs, sig)
        self.scale = _speed(model, timed, example_inputs, sig) if quantize else 1.0

    def ratio(self, scales: Mapping[str, float]) -> float:
        """Estimated time over the (float) dense model's when each module's work is scaled by
        ``scales[name]`` (1.0 where not given)."""
        return self.scale * sum(share * scales.get(name, 1.0) for name, share in self.shares.items())


def _shares(model: nn.Module, example_inputs, sig: str) -> dict[str, float]:
    """Each module's share of ``model``'s profiled time, from the table under ``sig`` or measured."""
    names = [n for n, _ in model.named_modules()]
    keys = {json.dumps(["module time", sig, n]): n for n in names}

    def measure() -> dict[str, float]:
        seconds = profile(model, example_inputs)
        return {key: seconds[name] for key, name in keys.items()}

    seconds = latency_table.table().many(list(keys), measure)
    total = sum(seconds.values())
    return {name: seconds[key] / total for key, name in keys.items()}


def _speed(model: nn.Module, quantized_model: nn.Module, example_inputs, sig: str) -> float:
    """``quantized_model``'s time over ``model``'s (the median of interleaved rounds, as the
    finalists are timed; not the profiles' sums, which the hooks' own cost pulls towards 1)."""
    return latency_table.table().seconds(json.dumps(["quantized time ratio", sig]), lambda: latency_ratios(
        [model, quantized_model], example_inputs, rounds=SPEED_ROUNDS, min_run_time=SPEED_RUN_TIME)[1].value)
