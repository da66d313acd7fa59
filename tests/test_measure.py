import copy
import dataclasses
import math
import random
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import pangkas
from pangkas.measure import (Ratio, count_macs, latency_ratios, min_rounds, ratios_from_samples, time_alternating,
                             time_rounds)
from pangkas.weights.masks import get_mask

from conftest import mlp


def test_macs_of_linear_and_conv_follow_the_formulas():
    linear = nn.Linear(32, 16)
    assert count_macs(linear, torch.randn(5, 32)) == 5 * 32 * 16
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_macs(conv, torch.randn(2, 3, 10, 10)) == 2 * 8 * 10 * 10 * 3 * 3 * 3
    grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
    assert count_macs(grouped, torch.randn(1, 8, 6, 6)) == 8 * 6 * 6 * 2 * 3 * 3


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


def test_macs_count_fused_attention_kernels():  # inference fast path, CPU flash SDPA: same maths
    x = torch.randn(2, 6, 16)
    projections = 2 * 6 * 16 * (3 * 16) + 2 * 6 * 16 * 16
    scores_and_mixing = 2 * (2 * 2 * 6 * 6 * 8)  # batch x heads x queries x keys x head_dim, twice
    assert count_macs(SelfAttention().eval(), x) == projections + scores_and_mixing


def test_measure_counts_params_nonzeros_and_bytes():
    model = mlp()
    x = torch.randn(4, 32)
    dense = pangkas.measure(model, x, latency=False)
    params = sum(p.numel() for p in model.parameters())
    assert dense.params == params == dense.nonzero_params
    assert dense.param_bytes == 4 * params
    assert dense.macs == 4 * (32 * 64 + 64 * 48 + 48 * 10)
    assert dense.latency_ms is None
    pangkas.prune_weights(model, sparsity=0.9)
    sparse = pangkas.measure(model, x, latency=False)
    assert sparse.nonzero_params == params - sum(round(0.9 * n) for n in (32 * 64, 64 * 48, 48 * 10))
    # Independently of the library's counting: the kept entries of each mask, plus every bias
    # element (biases are not pruned, and none of them is zero).
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(bool(m.bias.ne(0).all()) for m in linears)
    kept = sum(int(get_mask(m).sum()) for m in linears)
    biases = sum(m.bias.numel() for m in linears)
    assert sparse.nonzero_params == kept + biases
    assert sparse.params == params and sparse.macs == dense.macs  # zeros still cost MACs
    assert sparse.param_bytes == dense.param_bytes  # masked weights are still stored densely
    assert sparse.file_bytes_dense == pytest.approx(dense.file_bytes_dense, rel=0.02)
    assert sparse.file_bytes_compressed < 0.2 * dense.file_bytes_compressed
    assert sparse.sparsity == pytest.approx((params - kept - biases) / params)


def test_file_sizes_match_what_save_writes(tmp_path):
    model = mlp()
    pangkas.prune_weights(model, sparsity=0.8)
    m = pangkas.measure(model, torch.randn(1, 32), latency=False)
    path = pangkas.save(model, tmp_path / "m.safetensors")
    assert m.file_bytes_compressed == path.stat().st_size


def test_measure_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    model.train()
    state = copy.deepcopy(model.state_dict())
    result = pangkas.measure(model, torch.randn(16, 8), min_run_time=0.01)
    assert result.latency_ms > 0 and result.threads == torch.get_num_threads()
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # BatchNorm running stats untouched


def test_measure_accepts_tuple_and_dict_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, x, scale=1.0):
            return self.a(x) * scale

    model = TwoInputs()
    x = torch.randn(2, 4)
    assert pangkas.measure(model, (x, 2.0), latency=False).macs == 2 * 4 * 3
    assert pangkas.measure(model, {"x": x, "scale": 2.0}, latency=False).macs == 2 * 4 * 3
    with pytest.raises(pangkas.PangkasError, match="batch must be"):
        pangkas.measure(model, "not a batch", latency=False)


def test_compare_shows_values_and_ratios():
    model = mlp()
    x = torch.randn(1, 32)
    before = pangkas.measure(model, x, latency=False)
    pangkas.prune_weights(model, sparsity=0.5)
    after = pangkas.measure(model, x, latency=False)
    table = pangkas.compare(before, after)
    row = next(line for line in table.splitlines() if "non-zero parameters" in line)
    ratio = after.nonzero_params / before.nonzero_params
    assert f"{ratio:.3f}" in row and "after/before" in table
    assert "latency" not in table  # not measured, not shown
    named = pangkas.compare(before, after, after, names=("dense", "a", "b"))
    assert "a/dense" in named and "b/dense" in named
    with pytest.raises(pangkas.PangkasError, match="names"):
        pangkas.compare(before, after, names=("only one",))


def test_time_alternating_orders_models_by_cost():
    small, big = nn.Linear(64, 64), nn.Sequential(*[nn.Linear(64, 64) for _ in range(30)])
    t_small, t_big = time_alternating([small, big], torch.randn(64, 64), rounds=3, min_run_time=0.05)
    assert t_big > t_small > 0


def test_compare_shows_latency_ratios_only_with_their_intervals():
    model = mlp()
    before = dataclasses.replace(pangkas.measure(model, torch.randn(1, 32), latency=False), latency_ms=2.0)
    after = dataclasses.replace(before, latency_ms=1.0)
    row = next(line for line in pangkas.compare(before, after).splitlines() if "latency" in line)
    assert [cell.strip() for cell in row.split("│")[2:5]] == ["2.000", "1.000", "-"]  # separate runs: no ratio
    ratios = [Ratio(1.0, 1.0, 1.0, 6, 0.95), Ratio(0.5, 0.45, 0.55, 6, 0.95)]
    row = next(line for line in pangkas.compare(before, after, latency=ratios).splitlines() if "latency" in line)
    assert "0.50x (0.45-0.55)" in row
    with pytest.raises(pangkas.PangkasError, match="latency ratios"):
        pangkas.compare(before, after, latency=ratios[:1])


def _synthetic_rounds(ratio: float, noise: float, rounds: int = 12, seed: int = 0) -> list[list[float]]:
    """[round][baseline, model] seconds: a drift common to both within a round (factor up to 3,
    what a busy machine does) and independent log-normal noise per timing."""
    rng = random.Random(seed)
    samples = []
    for _ in range(rounds):
        drift = 1e-3 * rng.uniform(1, 3)
        samples.append([drift * math.exp(noise * rng.gauss(0, 1)),
                        ratio * drift * math.exp(noise * rng.gauss(0, 1))])
    return samples


def test_identical_models_show_no_measurable_difference():
    same = ratios_from_samples([[1e-3, 1e-3]] * 6)[1]
    assert (same.value, same.low, same.high) == (1.0, 1.0, 1.0) and str(same) == "no measurable difference"
    noisy = ratios_from_samples(_synthetic_rounds(1.0, noise=0.05))[1]
    assert noisy.low < 1 < noisy.high and not noisy.measurable
    assert str(noisy) == "no measurable difference"


def test_a_clear_difference_has_an_interval_excluding_one_and_containing_the_truth():
    baseline, slower = ratios_from_samples(_synthetic_rounds(2.0, noise=0.05))
    assert str(baseline) == "no measurable difference"  # the baseline against itself
    assert slower.measurable and 1 < slower.low <= slower.value <= slower.high
    assert slower.low < 2.0 < slower.high
    assert slower.high / slower.low < 1.2  # the threefold drift cancels within rounds
    assert str(slower) == f"{slower.value:.2f}x ({slower.low:.2f}-{slower.high:.2f})"
    faster = ratios_from_samples(_synthetic_rounds(2.0, noise=0.05), baseline=1)[0]
    assert faster.low < 0.5 < faster.high
    assert faster.meets(faster.high) and not faster.meets(faster.value)  # the upper end must be within


def test_interval_widens_with_noise_and_is_deterministic():
    widths = [(r.high - r.low) for r in (ratios_from_samples(_synthetic_rounds(0.5, noise))[1]
                                         for noise in (0.01, 0.05, 0.2))]
    assert widths[0] < widths[1] < widths[2]
    samples = _synthetic_rounds(0.5, 0.1)
    assert ratios_from_samples(samples) == ratios_from_samples(samples)
    assert ratios_from_samples(samples[::-1]) == ratios_from_samples(samples)  # order of rounds is irrelevant


def test_interval_is_the_order_statistic_interval_of_the_median():
    assert [min_rounds(c) for c in (0.9, 0.95, 0.99)] == [5, 6, 8]  # 1 - 2 / 2**n reaches c
    samples = [[1.0, float(r)] for r in range(12, 0, -1)]  # per-round ratios 12..1
    # 12 rounds: the 3rd smallest and 3rd largest cover the median with 1 - 2 * 79 / 4096 = 96.1%
    # (the 4th: 1 - 2 * 299 / 4096 = 85.4%, below 95%)
    assert ratios_from_samples(samples)[1] == Ratio(6.5, 3.0, 10.0, 12, 0.95)
    assert ratios_from_samples(samples, confidence=0.8)[1] == Ratio(6.5, 4.0, 9.0, 12, 0.8)
    assert ratios_from_samples(samples[:6])[1] == Ratio(9.5, 7.0, 12.0, 6, 0.95)  # min..max


@pytest.mark.parametrize("call, match", [
    (lambda: ratios_from_samples([[1.0, 1.0]] * 5), "at least 6 rounds"),
    (lambda: ratios_from_samples([[1.0, 1.0]] * 7, confidence=0.99), "at least 8 rounds"),
    (lambda: ratios_from_samples([[1.0, 1.0]] * 6, confidence=1.0), "confidence"),
    (lambda: ratios_from_samples([[1.0, 1.0]] * 6, confidence=0), "confidence"),
    (lambda: ratios_from_samples([[1.0, 1.0]] * 6, baseline=2), "baseline"),
    (lambda: ratios_from_samples([[1.0, 1.0]] * 6, baseline=-1), "baseline"),
    (lambda: ratios_from_samples([[1.0, 1.0]] * 5 + [[1.0]]), "every model"),
    (lambda: ratios_from_samples([[1.0, 0.0]] * 6), "positive"),
    (lambda: ratios_from_samples([[]] * 6), "at least one model"),
    (lambda: latency_ratios([], torch.randn(1, 4)), "at least one model"),
    (lambda: time_rounds([nn.Linear(4, 4)], torch.randn(1, 4), rounds=0), "rounds"),
])
def test_latency_ratio_arguments_are_checked(call, match):
    with pytest.raises(pangkas.PangkasError, match=match):
        call()


class _Broken(nn.Module):
    def forward(self, x):
        raise AssertionError("timed although the arguments were bad")


@pytest.mark.parametrize("kwargs, match", [
    ({"rounds": 5}, "at least 6 rounds"), ({"rounds": 6.0}, "rounds"), ({"baseline": 2}, "baseline"),
    ({"confidence": 1.5}, "confidence")])
def test_latency_ratios_check_arguments_before_timing(kwargs, match):
    with pytest.raises(pangkas.PangkasError, match=match):
        latency_ratios([nn.Identity(), _Broken()], torch.randn(1, 4), **kwargs)


def test_rounds_rotate_the_order_and_feed_the_ratios(monkeypatch):
    calls, seconds = [], {0: 2e-3, 1: 1e-3, 2: 2e-3}

    def fake_timer(model, inputs):
        index = model.index
        return SimpleNamespace(blocked_autorange=lambda min_run_time: (calls.append(index),
                                                                      SimpleNamespace(median=seconds[index]))[1])

    monkeypatch.setattr(sys.modules["pangkas.measure"], "_timer", fake_timer)  # pangkas.measure: the function
    models = [nn.Identity() for _ in range(3)]
    for i, model in enumerate(models):
        model.index = i
    ratios = latency_ratios(models, torch.randn(1, 4), rounds=6)
    assert calls == [0, 1, 2, 1, 2, 0, 2, 0, 1] * 2  # every model each round, first place rotating
    assert [r.value for r in ratios] == [1.0, 0.5, 1.0]
    assert [str(r) for r in ratios] == ["no measurable difference", "0.50x (0.50-0.50)", "no measurable difference"]


def test_latency_ratios_on_real_models():
    small, big = nn.Linear(64, 64), nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)])
    big.train()
    ratios = latency_ratios([small, big], torch.randn(16, 64), rounds=6, min_run_time=0.01)
    assert ratios[0] == Ratio(1.0, 1.0, 1.0, 6, 0.95)
    assert all(0 < r.low <= r.value <= r.high and r.rounds == 6 for r in ratios)
    assert big.training  # timed in eval mode, left as it was
