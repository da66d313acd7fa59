"""importance="obs": the error a channel's removal leaves once its readers are re-fitted."""

import copy

import pytest
import torch
from torch import nn

import pangkas
from pangkas.importance import removal_errors


def brute_force(x_cols: torch.Tensor, weight2d: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """Mean squared output error of dropping each group of columns and re-fitting the rest."""
    target = x_cols @ weight2d.T
    errors = []
    for cols in groups:
        rest = [c for c in range(x_cols.shape[1]) if c not in cols]
        fit = torch.linalg.lstsq(x_cols[:, rest], target).solution
        errors.append(float((x_cols[:, rest] @ fit - target).pow(2).sum() / len(x_cols)))
    return torch.tensor(errors, dtype=torch.float64)


def test_linear_errors_are_the_least_squares_residuals():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    w = torch.randn(5, 6, generator=g, dtype=torch.float64)
    hinv = torch.linalg.inv(x.T @ x / len(x))
    expected = brute_force(x, w, [[j] for j in range(6)])
    assert torch.allclose(removal_errors(w, hinv).double(), expected, rtol=1e-4)


def test_conv_channels_go_with_all_their_taps():
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(3, 4, 2, bias=False).double()
    images = torch.randn(50, 3, 5, 5, generator=g, dtype=torch.float64)
    cols = nn.functional.unfold(images, 2).transpose(1, 2).reshape(-1, 12)  # (c, kh, kw) order
    hinv = torch.linalg.inv(cols.T @ cols / len(cols))
    expected = brute_force(cols, conv.weight.detach().reshape(4, 12), [list(range(c * 4, c * 4 + 4)) for c in range(3)])
    assert torch.allclose(removal_errors(conv.weight.detach(), hinv).double(), expected, rtol=1e-4)


def test_a_duplicated_channel_costs_nothing_to_remove():
    """Channel 5 repeats channel 2: with a re-fit either copy can go for free, so obs removes one
    of them; by magnitude they are the largest and would stay."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[0].weight[2] *= 5
        model[0].weight[5] = model[0].weight[2]
        model[0].bias[5] = model[0].bias[2]
    data = [torch.randn(64, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    ratios = {"0": 1 / 8}
    by_obs = pangkas.plan_channels(model, data[0], ratio=0.0, ratios=ratios, importance="obs", data=data)
    by_l1 = pangkas.plan_channels(model, data[0], ratio=0.0, ratios=ratios, importance="l1")
    gone = lambda plan: sorted(set(range(8)) - set(plan.keep()["0.weight"][0].tolist()))  # noqa: E731
    assert gone(by_obs) in ([2], [5]) and gone(by_l1) not in ([2], [5])
    x = torch.cat(data)
    with torch.no_grad():
        reference = model(x)
    errors = {}
    for fit in (False, True):
        pruned = copy.deepcopy(model)
        plan = pangkas.plan_channels(pruned, data[0], ratio=0.0, ratios=ratios, importance="obs", data=data,
                                     reconstruct=fit)
        plan.apply()
        with torch.no_grad():
            errors[fit] = float((pruned(x) - reference).norm() / reference.norm())
    assert errors[True] < 0.05 * errors[False], errors  # what is left is the ridge term's


def test_the_default_importance_follows_the_data():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    data = [torch.randn(16, 4)]
    free = pangkas.plan_channels(model, data[0], ratio=0.5)
    assert free.options.importance == "l1" and "data-free" in str(free)
    aware = pangkas.plan_channels(model, data[0], ratio=0.5, data=data)
    assert aware.options.importance == "wanda" and "data-free" not in str(aware)
    assert pangkas.plan_channels(model, data[0], ratio=0.5, data=data, reconstruct=True).options.importance == "obs"


def test_obs_needs_data():
    with pytest.raises(pangkas.PangkasError, match="needs data"):
        pangkas.plan_channels(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(2, 4),
                              ratio=0.5, importance="obs")
