"""The equivalence oracle itself: its fp64 mode certifies what fp32 rounding cannot."""

import pytest
import torch
from torch import nn

import pangkas
from pangkas.oracle import oracle_error


class Cancelling(nn.Module):
    """Ill-conditioned: the output is the difference of two nearly equal convolutions, so fp32
    rounding (which changes when the summed channel count changes) dominates it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 32, 3, padding=1)
        self.a = nn.Conv2d(32, 8, 3, padding=1)
        self.b = nn.Conv2d(32, 8, 3, padding=1)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight * (1 + 1e-5))
            self.b.bias.copy_(self.a.bias)

    def forward(self, x):
        h = self.body(x).relu()
        return self.a(h) - self.b(h)


def _plan(x):
    return lambda m: pangkas.plan_channels(m, x, ratio=0.5)


def test_fp64_certifies_an_ill_conditioned_net_that_fp32_cannot():
    model, x = Cancelling(), torch.randn(2, 3, 8, 8)
    fp32, _ = oracle_error(model, x, _plan(x))
    fp64, plan = oracle_error(model, x, _plan(x), dtype=torch.float64)
    assert fp32 > 1e-3  # the fp32 check fails on rounding alone ...
    assert fp64 <= 1e-10  # ... the fp64 one certifies the same cut
    assert plan.model.body.out_channels == 16 and plan.params_after < plan.params_before


def test_fp64_still_sees_a_cut_that_changes_the_output(monkeypatch):
    model, x = Cancelling(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.b.weight.copy_(torch.randn_like(model.b.weight))  # well-conditioned now
    monkeypatch.setattr(pangkas.oracle, "silence_removed", lambda plan: [])  # removed channels still speak
    error, _ = oracle_error(model, x, _plan(x), dtype=torch.float64)
    assert error > 1e-2


def test_oracle_leaves_the_model_in_its_dtype():
    model, x = Cancelling(), torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    oracle_error(model, x, _plan(x), dtype=torch.float64)
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32 for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.int64, "float64"])
def test_oracle_refuses_a_non_float_dtype(dtype):
    with pytest.raises(pangkas.PangkasError, match="floating-point dtype"):
        oracle_error(Cancelling(), torch.randn(1, 3, 8, 8), _plan(torch.randn(1, 3, 8, 8)), dtype=dtype)
