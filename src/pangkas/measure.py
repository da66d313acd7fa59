"""Honest numbers: parameters, non-zeros, MACs, bytes, file sizes and CPU latency of a model, and
latency ratios between models with confidence intervals."""

from __future__ import annotations

import contextlib
import logging
import math
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


def time_rounds(models: Sequence[nn.Module], example_inputs: Any, *, rounds: int = 5,
                min_run_time: float = 0.2) -> list[list[float]]:
    """Seconds per forward, ``[round][model]``: each round times every model back to back, the
    order rotating from round to round, so that changing load on a shared machine hits every
    model alike and no model is always timed first (warmest cache) or last."""
    if not models:
        raise PangkasError("timing needs at least one model")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise PangkasError(f"rounds must be a positive integer, got {rounds!r}")
    samples = [[0.0] * len(models) for _ in range(rounds)]
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(_eval_mode(model))
            call_model(model, example_inputs)  # warm-up: lazy init, allocator
        timers = [_timer(model, example_inputs) for model in models]
        for r in range(rounds):
            for step in range(len(models)):
                i = (r + step) % len(models)
                samples[r][i] = timers[i].blocked_autorange(min_run_time=min_run_time).median
    return samples


def time_alternating(models: Sequence[nn.Module], example_inputs: Any, *, rounds: int = 5,
                     min_run_time: float = 0.2) -> list[float]:
    """Median seconds per forward of each model over ``rounds`` interleaved rounds (``time_rounds``).
    To compare models, prefer ``latency_ratios``: it says how sure the ratio is."""
    samples = time_rounds(models, example_inputs, rounds=rounds, min_run_time=min_run_time)
    return [statistics.median(times) for times in zip(*samples)]


@dataclass(frozen=True)
class Ratio:
    """A latency ratio (model / baseline): the median of per-round ratios, with a ``confidence``
    interval ``low``..``high`` for that median from ``rounds`` rounds. The baseline itself is
    1.0 (1.0-1.0): no measurable difference."""

    value: float
    low: float
    high: float
    rounds: int
    confidence: float

    @property
    def measurable(self) -> bool:
        """False when the interval contains 1.0: no difference from the baseline can be told."""
        return not self.low <= 1.0 <= self.high

    def meets(self, target: float) -> bool:
        """Whether the ratio is at most ``target`` even at the interval's upper end."""
        return self.high <= target

    def format(self, digits: int = 2) -> str:
        if not self.measurable:
            return "no measurable difference"
        return f"{self.value:.{digits}f}x ({self.low:.{digits}f}-{self.high:.{digits}f})"

    def __str__(self) -> str:
        return self.format()


def _coverage(rounds: int, k: int) -> float:
    """Probability that the k-th smallest and k-th largest of ``rounds`` independent samples
    bracket the distribution's median: 1 - 2 P(Binomial(rounds, 1/2) < k)."""
    return 1 - 2 * sum(math.comb(rounds, i) for i in range(k)) / 2 ** rounds


def min_rounds(confidence: float = 0.95) -> int:
    """Fewest rounds whose smallest and largest ratio bracket the median at ``confidence``."""
    _check_confidence(confidence)
    rounds = 1
    while _coverage(rounds, 1) < confidence:
        rounds += 1
    return rounds


def _check_confidence(confidence: float) -> None:
    if not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise PangkasError(f"confidence must be between 0 and 1 (exclusive), got {confidence!r}")


def _check_request(models: int, baseline: int, rounds: int, confidence: float) -> None:
    _check_confidence(confidence)
    if models < 1:
        raise PangkasError("latency ratios need at least one model")
    if isinstance(baseline, bool) or not isinstance(baseline, int) or not 0 <= baseline < models:
        raise PangkasError(f"baseline must be a model index in 0..{models - 1}, got {baseline!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < min_rounds(confidence):
        raise PangkasError(f"rounds={rounds!r} cannot give a {confidence:.0%} interval: "
                           f"use at least {min_rounds(confidence)} rounds")


def ratios_from_samples(samples: Sequence[Sequence[float]], *, baseline: int = 0,
                        confidence: float = 0.95) -> list[Ratio]:
    """Each model's latency ratio to ``baseline`` from seconds per ``[round][model]``.

    The interval is the distribution-free order-statistic interval for the median of the
    per-round ratios: exact coverage whatever the noise looks like (timings are skewed, with
    outliers), assuming only that rounds are independent; no resampling, so no seed, and the same
    samples always give the same interval. (A bootstrap of the median is unreliable for the
    handful of rounds timing affords.)
    """
    models = len(samples[0]) if samples else 0
    if any(len(row) != models for row in samples):
        raise PangkasError("every round must time every model")
    _check_request(models, baseline, len(samples), confidence)
    if not all(math.isfinite(t) and t > 0 for row in samples for t in row):
        raise PangkasError("timings must be positive, finite seconds")
    rounds = len(samples)
    # The innermost pair of order statistics whose coverage still reaches ``confidence``: the
    # narrowest interval that keeps the promise.
    k = max(k for k in range(1, (rounds + 1) // 2 + 1) if _coverage(rounds, k) >= confidence)
    result = []
    for i in range(models):
        ratios = sorted(row[i] / row[baseline] for row in samples)
        result.append(Ratio(statistics.median(ratios), ratios[k - 1], ratios[rounds - k], rounds, confidence))
    return result


def latency_ratios(models: Sequence[nn.Module], example_inputs: Any, *, baseline: int = 0,
                   rounds: int = 10, confidence: float = 0.95, min_run_time: float = 0.2) -> list[Ratio]:
    """Each model's CPU latency relative to ``models[baseline]``, with a ``confidence`` interval,
    from ``rounds`` interleaved rounds (``time_rounds``). Print a ``Ratio``: "0.43x (0.41-0.45)",
    or "no measurable difference" when the interval contains 1.0."""
    _check_request(len(models), baseline, rounds, confidence)  # before any time is spent
    samples = time_rounds(models, example_inputs, rounds=rounds, min_run_time=min_run_time)
    return ratios_from_samples(samples, baseline=baseline, confidence=confidence)


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


def compare(*measurements: Measurement, names: Sequence[str] | None = None,
            latency: Sequence[Ratio] | None = None) -> str:
    """A table of measurements side by side (``compare(before, after)``), each with its ratio to
    the first.

    Latencies measured in separate calls are not compared (load on the machine changes between
    them); pass ``latency=latency_ratios([first, ...], inputs)`` for interleaved ratios with their
    intervals.
    """
    if not measurements:
        raise PangkasError("compare() needs at least one Measurement")
    default = ("before", "after") if len(measurements) == 2 else tuple(f"#{i}" for i in range(len(measurements)))
    names = tuple(names) if names is not None else default
    if len(names) != len(measurements):
        raise PangkasError(f"{len(measurements)} measurements but {len(names)} names")
    if latency is not None and len(latency) != len(measurements):
        raise PangkasError(f"{len(measurements)} measurements but {len(latency)} latency ratios")
    columns = ["metric", names[0]]
    for name in names[1:]:
        columns += [name, f"{name}/{names[0]}"]
    rows = []
    for label, get, fmt in _ROWS:
        values = [get(m) for m in measurements]
        timed = label.startswith("latency")
        if all(v is None for v in values) and not (timed and latency):
            continue
        row = [label, "-" if values[0] is None else fmt(values[0])]
        for i, value in enumerate(values[1:], 1):
            if timed:
                ratio = str(latency[i]) if latency else "-"
            else:
                ratio = f"{value / values[0]:.3f}" if value is not None and values[0] else "-"
            row += ["-" if value is None else fmt(value), ratio]
        rows.append(row)
    threads = sorted({m.threads for m in measurements})
    return render_table(f"measured with {', '.join(map(str, threads))} thread(s)", columns, rows)
