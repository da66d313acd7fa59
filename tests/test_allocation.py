import copy

import pytest
import torch
from torch import nn

import pangkas
from pangkas import allocation
from pangkas.selection import Group


class TwoBranches(nn.Module):
    """Two hidden layers of equal size side by side; ``loud`` scales what one of them contributes,
    so removing its neurons distorts the output ``loud`` times more."""

    def __init__(self, loud: float = 20.0):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(16, 32)
        self.out_a, self.out_b = nn.Linear(32, 8), nn.Linear(32, 8)
        with torch.no_grad():
            self.out_a.weight.mul_(loud)

    def forward(self, x):
        return self.out_a(torch.relu(self.a(x))) + self.out_b(torch.relu(self.b(x)))


def _batches(n=4):
    torch.manual_seed(1)
    return [torch.randn(64, 16) for _ in range(n)]


def _group(size, removed, name):
    g = Group((name,), torch.arange(size), torch.zeros(size), torch.zeros(size, dtype=torch.bool))
    g.removed[:removed] = True
    return g


def test_split_gives_the_flatter_group_more_and_keeps_the_budget():
    groups = [_group(100, 20, "a"), _group(100, 20, "b")]
    curves = {id(groups[0]): [(0.2, 1.0), (0.4, 4.0)], id(groups[1]): [(0.2, 4.0), (0.4, 16.0)]}
    cost = {id(g): 3.0 for g in groups}
    a, b = allocation.split(groups, curves, cost)
    assert a + b == 40
    assert a == pytest.approx(4 * b, abs=1)  # share inversely proportional to curvature
    # caps: no group goes past the largest fraction it was measured at
    curves[id(groups[1])] = [(0.2, 1e-9), (0.4, 1e-9)]
    a, b = allocation.split(groups, curves, cost)
    assert b == 40 and a == 0
    # the budget is in parameters: at equal distortion a channel that frees more of them goes first
    curves[id(groups[1])] = [(0.2, 1.0), (0.4, 4.0)]
    cost[id(groups[1])] = 9.0
    a, b = allocation.split(groups, curves, cost)
    assert 3 * a + 9 * b == pytest.approx(3 * 20 + 9 * 20, abs=9)
    assert b == pytest.approx(3 * a, abs=1)


def test_sensitivity_allocation_spares_the_layer_that_matters():
    torch.manual_seed(0)
    model, data = TwoBranches(), _batches()
    state = copy.deepcopy(model.state_dict())
    uniform = pangkas.plan_channels(model, data[0], ratio=0.5, data=data)
    plan = pangkas.plan_channels(model, data[0], ratio=0.5, data=data, allocation="sensitivity")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # measuring left it as it was
    kept = {k: len(v[0]) for k, v in plan.keep().items() if k in ("a.weight", "b.weight")}
    assert kept["a.weight"] > 16 > kept["b.weight"]  # the loud branch keeps more
    assert abs(plan.params_after - uniform.params_after) <= 16 + 1 + 8  # one neuron's parameters
    assert kept["a.weight"] + kept["b.weight"] == 32
    plan.apply()
    assert model.a.out_features == kept["a.weight"]
    x = data[0]
    pruned_error = (model(x) - TwoBranches.forward(copy.deepcopy(model), x)).abs().max()
    assert pruned_error == 0  # it still runs


def test_sensitivity_allocation_lowers_the_distortion_it_measures():
    torch.manual_seed(0)
    dense, data = TwoBranches(loud=5.0), _batches()
    errors = {}
    for how in ("uniform", "sensitivity"):
        model = copy.deepcopy(dense)
        pangkas.prune_channels(model, data[0], ratio=0.5, data=data, allocation=how)
        with torch.no_grad():
            errors[how] = sum(float((model(x) - dense(x)).pow(2).sum()) for x in data)
    assert errors["sensitivity"] < 0.8 * errors["uniform"]


def test_transformer_allocation_keeps_each_units_total(tiny_llama):
    model, ids = tiny_llama
    data = [{"input_ids": ids[i:i + 32][None]} for i in range(0, 96, 32)]
    dense = copy.deepcopy(model)
    plan = pangkas.plan_transformer(model, data[0], ffn=0.5, heads=0.5, data=data, allocation="sensitivity")
    assert plan.removed == pytest.approx({"ffn": 0.5, "heads": 0.5}, abs=1 / 192)
    widths = [len(plan.keep()[f"model.layers.{i}.mlp.up_proj.weight"][0]) for i in range(3)]
    assert sum(widths) == pytest.approx(96, abs=1)
    assert len(set(widths)) > 1  # random layers differ in sensitivity: not uniform
    plan.apply()
    assert [layer.mlp.up_proj.out_features for layer in model.model.layers] == widths
    assert model(**data[0]).logits.shape == dense(**data[0]).logits.shape


def test_allocation_is_refused_without_what_it_needs(tiny_llama):
    model, data = TwoBranches(), _batches()
    with pytest.raises(pangkas.PangkasError, match="data="):
        pangkas.plan_channels(model, data[0], ratio=0.5, allocation="sensitivity")
    with pytest.raises(pangkas.PangkasError, match="allocation must be"):
        pangkas.plan_channels(model, data[0], ratio=0.5, data=data, allocation="owl")
    with pytest.raises(pangkas.PangkasError, match="scope='global'"):
        pangkas.plan_channels(model, data[0], ratio=0.5, data=data, scope="global", allocation="sensitivity")
    llama, ids = tiny_llama
    with pytest.raises(pangkas.PangkasError, match="data="):
        pangkas.plan_transformer(llama, {"input_ids": ids[None, :16]}, ffn=0.5, allocation="sensitivity")


def test_an_interrupted_measurement_leaves_the_model_as_it_was(monkeypatch):
    model, data = TwoBranches(), _batches()
    state = copy.deepcopy(model.state_dict())
    calls = []

    def interrupted(self):
        calls.append(1)
        if len(calls) == 3:  # mid-way: some group silenced right now
            raise KeyboardInterrupt
        return 1.0

    monkeypatch.setattr(allocation.Distortion, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pangkas.plan_channels(model, data[0], ratio=0.5, data=data, allocation="sensitivity")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
