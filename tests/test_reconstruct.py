"""Least-squares reconstruction of the layers that read removed channels (reconstruct=True)."""

import copy

import pytest
import torch
from torch import nn

import pangkas
from pangkas.reconstruct import consumers, reconstruct


def correlated_inputs(n=256, features=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 4, generator=g)
    return base @ torch.randn(4, features, generator=g) + 0.05 * torch.randn(n, features, generator=g)


def relative_error(model, reference, x):
    with torch.no_grad():
        return float((model(x) - reference).norm() / reference.norm())


def mlp(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32, bias=bias), nn.ReLU(), nn.Linear(32, 24, bias=bias), nn.ReLU(),
                         nn.Linear(24, 10, bias=bias)).eval()


@pytest.mark.parametrize("bias", [True, False])
def test_reconstruction_recovers_most_of_what_removal_loses(bias):
    x = correlated_inputs()
    base = mlp(bias)
    reference = base(x).detach()
    errors = {}
    for fit in (False, True):
        model = copy.deepcopy(base)
        pangkas.prune_channels(model, x[:8], ratio=0.5, importance="wanda", data=list(x.split(32)), reconstruct=fit)
        errors[fit] = relative_error(model, reference, x)
    assert model[2].in_features == 16 and model[4].in_features == 12
    assert errors[True] < 0.5 * errors[False], errors


def test_the_fit_is_the_least_squares_solution():
    """One consumer, (almost) no damping: the re-fitted weights solve the normal equations."""
    x = correlated_inputs(features=8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 5)).eval()
    with torch.no_grad():
        hidden = model[1](model[0](x)).double()
        target = model(x).double()
    plan = pangkas.plan_channels(model, x[:4], ratio=0.5)
    kept = plan.keep()["2.weight"][1]
    put_back = reconstruct(plan, [x], damp=1e-9)
    design = torch.cat([hidden[:, kept], torch.ones(len(x), 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(design, target).solution.T
    got = torch.cat([model[2].weight[:, kept], model[2].bias[:, None]], 1).double()
    assert torch.allclose(got, solution, atol=1e-4, rtol=1e-3)
    removed = torch.ones(12, dtype=torch.bool)
    removed[kept] = False
    assert (model[2].weight[:, removed] == 0).all()
    put_back()
    assert torch.allclose(model(x).double(), target)


def odd_first(tensor, dim):
    return (torch.arange(tensor.shape[dim]) % 2).float()


def test_dead_channels_change_nothing():
    """Removing channels that carry nothing is exact with or without the fit."""
    x = correlated_inputs()
    model = mlp()
    with torch.no_grad():
        model[0].weight[::2] = 0
        model[0].bias[::2] = -1  # relu: dead for every input
    reference = model(x).detach()
    plan = pangkas.plan_channels(model, x[:8], ratio=0.0, ratios={"0": 0.5}, importance=odd_first,
                                 data=list(x.split(32)), reconstruct=True)
    assert plan.keep()["0.weight"][0].tolist() == list(range(1, 32, 2))
    plan.apply()
    assert relative_error(model, reference, x) < 1e-6


def test_convolutions_are_refitted_on_their_patches():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 6, 6, generator=g).repeat(1, 3, 1, 1) + 0.1 * torch.randn(64, 3, 6, 6, generator=g)
    reference = base(x).detach()
    errors = {}
    for fit in (False, True):
        model = copy.deepcopy(base)
        pangkas.prune_channels(model, x[:2], ratio=0.5, data=list(x.split(16)), reconstruct=fit)
        errors[fit] = relative_error(model, reference, x)
    assert model[3].in_channels == 8
    assert errors[True] < 0.7 * errors[False], errors


def test_a_transformer_block_by_block(tiny_llama):
    model, ids = tiny_llama
    batches = [{"input_ids": ids[i * 24:(i + 1) * 24].view(2, 12)} for i in range(4)]
    with torch.no_grad():
        reference = model(**batches[0]).logits
    errors = {}
    for fit in (False, True):
        pruned = copy.deepcopy(model)
        pangkas.prune_transformer(pruned, batches[0], ffn=0.5, heads=0.5, importance="wanda", data=batches,
                                  reconstruct=fit)
        with torch.no_grad():
            errors[fit] = float((pruned(**batches[0]).logits - reference).norm() / reference.norm())
    assert set(consumers_of(pruned)) == set()  # nothing left to cut
    assert errors[True] < 0.8 * errors[False], errors


def consumers_of(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.in_features == 0]


def test_consumers_are_the_layers_whose_inputs_are_cut():
    x = correlated_inputs()
    plan = pangkas.plan_channels(mlp(), x[:8], ratio=0.5)
    assert sorted(consumers(plan)) == ["2", "4"]


def test_reconstruct_needs_data():
    with pytest.raises(pangkas.PangkasError, match="data="):
        pangkas.plan_channels(mlp(), torch.randn(2, 16), ratio=0.5, reconstruct=True)
    with pytest.raises(pangkas.PangkasError, match="True or False"):
        pangkas.plan_channels(mlp(), torch.randn(2, 16), ratio=0.5, reconstruct="yes")


def test_a_failure_while_fitting_leaves_the_model(monkeypatch):
    x = correlated_inputs()
    model = mlp()
    state = copy.deepcopy(model.state_dict())
    plan = pangkas.plan_channels(model, x[:8], ratio=0.5, data=list(x.split(32)), reconstruct=True)
    real, calls = pangkas.reconstruct._refit, []

    def refit_then_interrupt(*args):
        calls.append(1)
        if len(calls) == 2:  # the first consumer was already re-fitted
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(pangkas.reconstruct, "_refit", refit_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        plan.apply()
    assert not plan.applied and len(calls) == 2
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
