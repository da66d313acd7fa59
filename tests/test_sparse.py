import pytest
import torch
from torch import nn

import pangkas
from pangkas import SparseLinear


@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_matches_dense(bias):
    linear = nn.Linear(48, 24, bias=bias)
    pangkas.prune_weights(linear, sparsity=0.9)
    sparse = SparseLinear.from_linear(linear)
    x = torch.randn(3, 5, 48)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), linear(x), rtol=1e-5, atol=1e-5)
    assert sparse.weight.layout == torch.sparse_csr
    assert sparse.weight.values().numel() == int((linear.weight != 0).sum())


def test_to_sparse_inference_swaps_only_sparse_enough_layers():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    pangkas.prune_weights(model, sparsity=0.95, include="0")
    pangkas.prune_weights(model, sparsity=0.5, include="2")
    x = torch.randn(7, 64)
    with torch.no_grad():
        expected = model(x)
    report = pangkas.to_sparse_inference(model, min_sparsity=0.9)
    assert list(report.swapped) == ["0"] and report.swapped["0"] == pytest.approx(0.95, abs=1e-3)
    assert set(report.kept) == {"2", "4"}
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert "sparse CSR" in str(report)


def test_non_float32_layers_stay_dense():
    model = nn.Sequential(nn.Linear(16, 16)).to(torch.bfloat16)
    pangkas.prune_weights(model, sparsity=0.99)
    report = pangkas.to_sparse_inference(model, min_sparsity=0.5)
    assert not report.swapped and "bfloat16" in report.kept["0"]


@pytest.mark.parametrize("value", [-0.1, 1.5, "high"])
def test_bad_min_sparsity(value):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(pangkas.PangkasError, match="min_sparsity"):
        pangkas.to_sparse_inference(model, min_sparsity=value)
    assert type(model[0]) is nn.Linear


def test_no_linear_or_bare_linear_is_refused():
    with pytest.raises(pangkas.PangkasError, match="no selected nn.Linear"):
        pangkas.to_sparse_inference(nn.Sequential(nn.ReLU()))
    with pytest.raises(pangkas.PangkasError, match="itself is a Linear"):
        pangkas.to_sparse_inference(nn.Linear(4, 4), min_sparsity=0)
