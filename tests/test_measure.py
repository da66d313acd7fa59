import copy

import pytest
import torch
from torch import nn

import pangkas
from pangkas.measure import count_macs, time_alternating
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
