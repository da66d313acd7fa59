"""Honest numbers: parameters, non-zeros, MACs, bytes, file sizes and CPU latency of a model."""

from __future__ import annotations

import contextlib
import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import PangkasError
from .inputs import call_model
from .io import encode, serialize
from .macs import FlopCounter
from .modules import evaluating
from .tables import human_bytes, human_count, render_table
from .weights.masks import effective_parameters, parameter_counts


@dataclass(frozen=True)
class Measurement:
    """One model's size and cost. ``latency_ms`` is the median of ``torch.utils.benchmark`` runs
    with ``threads`` intra-op threads; None when not measured."""

    params: int
    nonzero_params: int
    macs: int
    param_bytes: int
    file_bytes_dense: int
    file_bytes_compressed: int
    latency_ms: float | None
    threads: int

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def sparsity(self) -> float:
        return 1 - self.nonzero_params / self.params if self.params else 0.0


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Evaluate without side effects: BatchNorm statistics and dropout stay as in eval()."""
    if isinstance(model, torch.jit.ScriptModule):  # scripted/frozen: already fixed for inference
        with torch.no_grad():
            yield
        return
    with evaluating(model), torch.no_grad():
        yield


@contextlib.contextmanager
def _unfused_attention():
    """Fused attention kernels without a FLOP formula count as zero (nn.MultiheadAttention's
    inference fast path; scaled_dot_product_attention's CPU flash kernel): count their unfused
    paths, the same maths."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass, by torch's FLOP formulas (``macs.op_flops``).

    Dense maths: zeros in weights still count (only removing channels or layers lowers this).
    """
    with _eval_mode(model), _unfused_attention(), FlopCounter() as counter:
        call_model(model, example_inputs)
    return counter.flops // 2


def _timer(model: nn.Module, example_inputs: Any):
    # Imported late and quietly: torch.utils.benchmark pulls in cpp_extension, which warns that
    # there is no CUDA runtime, a message that means nothing for CPU timing.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        log.setLevel(level)

    return benchmark.Timer(
        stmt="call_model(model, inputs)",
        globals={"call_model": call_model, "model": model, "inputs": example_inputs},
        num_threads=torch.get_num_threads(),
    )


def time_forward(model: nn.Module, example_inputs: Any, *, min_run_time: float = 1.0) -> float:
    """Median seconds of one forward pass (``torch.utils.benchmark``, current thread count)."""
    return time_alternating([model], example_inputs, rounds=1, min_run_time=min_run_time)[0]


def time_alternating(models: Sequence[nn.Module], example_inputs: Any, *, rounds: int = 5,
                     min_run_time: float = 0.2) -> list[float]:
    """Median seconds per forward of each model, timed in turn for ``rounds`` rounds so that
    changing load on a shared machine hits every model alike. Compare these as ratios."""
    samples: list[list[float]] = [[] for _ in models]
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(_eval_mode(model))
            call_model(model, example_inputs)  # warm-up: lazy init, allocator
        timers = [_timer(model, example_inputs) for model in models]
        for _ in range(rounds):
            for timer, times in zip(timers, samples):
                times.append(timer.blocked_autorange(min_run_time=min_run_time).median)
    return [statistics.median(times) for times in samples]


def file_sizes(model: nn.Module) -> tuple[int, int]:
    """Bytes of the model as plain (dense) safetensors, and as ``pangkas.save`` writes it."""
    return tuple(len(serialize(*encode(model, compress=c))) for c in (False, True))


def measure(model: nn.Module, example_inputs: Any, *, latency: bool = True,
            min_run_time: float = 1.0) -> Measurement:
    """Measure ``model`` on ``example_inputs`` (a tensor, tuple or dict, as in ``model(...)``).

    The model is run in eval mode under ``no_grad`` and left exactly as it was.
    """
    params, nonzero = parameter_counts(model)
    dense, compressed = file_sizes(model)
    return Measurement(
        params=params,
        nonzero_params=nonzero,
        macs=count_macs(model, example_inputs),
        param_bytes=sum(p.numel() * p.element_size() for p in effective_parameters(model).values()),
        file_bytes_dense=dense,
        file_bytes_compressed=compressed,
        latency_ms=time_forward(model, example_inputs, min_run_time=min_run_time) * 1e3 if latency else None,
        threads=torch.get_num_threads(),
    )


_ROWS = (
    ("parameters", lambda m: m.params, human_count),
    ("non-zero parameters", lambda m: m.nonzero_params, human_count),
    ("MACs", lambda m: m.macs, human_count),
    ("parameter bytes", lambda m: m.param_bytes, human_bytes),
    ("file (dense safetensors)", lambda m: m.file_bytes_dense, human_bytes),
    ("file (pangkas.save)", lambda m: m.file_bytes_compressed, human_bytes),
    ("latency (ms, median)", lambda m: m.latency_ms, lambda v: f"{v:.3f}"),
)


def compare(*measurements: Measurement, names: Sequence[str] | None = None) -> str:
    """A table of measurements side by side (``compare(before, after)``), each with its ratio to
    the first."""
    if not measurements:
        raise PangkasError("compare() needs at least one Measurement")
    default = ("before", "after") if len(measurements) == 2 else tuple(f"#{i}" for i in range(len(measurements)))
    names = tuple(names) if names is not None else default
    if len(names) != len(measurements):
        raise PangkasError(f"{len(measurements)} measurements but {len(names)} names")
    columns = ["metric", names[0]]
    for name in names[1:]:
        columns += [name, f"{name}/{names[0]}"]
    rows = []
    for label, get, fmt in _ROWS:
        values = [get(m) for m in measurements]
        if all(v is None for v in values):
            continue
        row = [label, "-" if values[0] is None else fmt(values[0])]
        for value in values[1:]:
            ratio = f"{value / values[0]:.3f}" if value is not None and values[0] else "-"
            row += ["-" if value is None else fmt(value), ratio]
        rows.append(row)
    threads = sorted({m.threads for m in measurements})
    return render_table(f"measured with {', '.join(map(str, threads))} thread(s)", columns, rows)
