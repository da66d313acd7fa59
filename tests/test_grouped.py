"""Grouped convolutions and GroupNorm choose per group: each group keeps the same number of
channels, not the same offsets (selection's partitions)."""

import pytest
import torch
from torch import nn

import pangkas
from pangkas import selection
from pangkas.oracle import oracle_error, randomize

EXACT = 1e-5


class Bottleneck(nn.Module):
    """ResNeXt-like: 1x1 -> grouped 3x3 -> 1x1, with a residual."""

    def __init__(self, c=32, width=16, groups=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, width, 1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, groups=groups), nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c, 1)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return x + self.conv3(y)


# Dead channels at different offsets in each of the 4 groups of 4 (2 per group).
DEAD = [0, 1, 5, 6, 10, 11, 12, 15]


@torch.no_grad()
def _kill(conv: nn.Conv2d, bn: nn.BatchNorm2d, channels) -> None:
    """Make ``channels`` of conv -> bn output exactly 0 (and score lowest)."""
    for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean):
        t[channels] = 0


def _planted(side: str) -> Bottleneck:
    model = randomize(Bottleneck()).eval()
    if side == "input":
        _kill(model.conv1, model.bn1, DEAD)
    else:
        _kill(model.conv2, model.bn2, DEAD)
    return model


@pytest.mark.parametrize("side", ["input", "output"])
def test_dead_channels_at_different_offsets_per_group_go_exactly(side):
    model = _planted(side)
    x = torch.randn(2, 32, 8, 8)
    before = model(x)
    other = "conv3" if side == "input" else "conv1"  # only the planted side may lose channels
    plan = pangkas.plan_channels(model, x, ratio=0.5, exclude=[other])
    producer = "conv1.weight" if side == "input" else "conv2.weight"
    kept = plan.keep()[producer][0]
    assert kept.tolist() == [c for c in range(16) if c not in DEAD]
    plan.apply()
    assert model.conv2.groups == 4
    assert tuple(model.conv2.weight.shape[:2]) == ((16, 2) if side == "input" else (8, 4))
    # The channels were dead: removing them changes nothing, without any silencing.
    assert torch.allclose(model(x), before, atol=1e-6)


def test_tying_offsets_could_not_remove_them(monkeypatch):
    """What the planted test guards against: with offsets tied across groups, the same dead
    channels cannot all go, and the output changes."""
    monkeypatch.setattr(selection, "_holds", lambda *args: False)
    model = _planted("input")
    x = torch.randn(2, 32, 8, 8)
    before = model(x)
    plan = pangkas.plan_channels(model, x, ratio=0.5, exclude=["conv3"])
    assert plan.keep()["conv1.weight"][0].tolist() != [c for c in range(16) if c not in DEAD]
    plan.apply()
    assert not torch.allclose(model(x), before, atol=1e-3)


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("groups", [2, 4, 8])
def test_grouped_bottleneck_is_exact(scope, groups):
    model = randomize(Bottleneck(groups=groups)).eval()
    x = torch.randn(2, 32, 6, 6)
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5, scope=scope))
    assert error <= EXACT
    conv2 = plan.model.conv2
    assert conv2.groups == groups and conv2.in_channels < 16 and conv2.out_channels < 16


def test_every_group_keeps_the_same_count_and_rounding_holds():
    model = randomize(Bottleneck(width=32, groups=4)).eval()
    x = torch.randn(1, 32, 6, 6)
    plan = pangkas.plan_channels(model, x, ratio=0.3, round_to=8)
    rowed = [g for g in plan.selection.groups if g.rows is not None]
    assert len(rowed) == 2  # conv1's outputs (conv2's input groups) and conv2's outputs
    for g in rowed:
        kept = {int((~g.removed[row]).sum()) for row in g.rows}
        assert len(kept) == 1 and (4 * kept.pop()) % 8 == 0


class SplitFeed(nn.Module):
    """A grouped conv reading the concat of two producers: a row spans both, so the rows cannot
    choose alone (different groups would lose different counts): offsets are tied instead."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 10, 1)
        self.grouped = nn.Conv2d(16, 8, 3, padding=1, groups=2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.grouped(torch.cat([self.a(x), self.b(x)], 1))))


def test_rows_spanning_groups_fall_back_to_tied_offsets_and_stay_exact():
    model = randomize(SplitFeed()).eval()
    x = torch.randn(2, 3, 6, 6)
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert error <= EXACT
    assert plan.model.grouped.in_channels < 16 and plan.model.grouped.groups == 2


def _kept_importance(plan) -> float:
    return sum(float(g.scores[~g.removed].sum()) for g in plan.selection.groups)


def _compare_with_tied(model, x, monkeypatch, **options):
    per_group = pangkas.plan_channels(model, x, ratio=0.5, **options)
    with monkeypatch.context() as patch:
        patch.setattr(selection, "_holds", lambda *args: False)
        tied = pangkas.plan_channels(model, x, ratio=0.5, **options)
    return per_group, tied


@pytest.mark.parametrize("name", ["resnext50_32x4d", "regnet_x_400mf", "regnet_y_400mf"])
def test_per_group_choice_keeps_more_importance_than_tied_offsets(name, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    model = randomize(torchvision.models.get_model(name, weights=None)).eval()
    x = torch.randn(1, 3, 64, 64)
    per_group, tied = _compare_with_tied(model, x, monkeypatch)
    assert per_group.params_after == tied.params_after  # the same amount removed...
    assert _kept_importance(per_group) > _kept_importance(tied)  # ...chosen better


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))))


def test_group_norm_keeps_equal_groups_and_more_importance(monkeypatch):
    model = randomize(GroupNormNet()).eval()
    x = torch.randn(2, 3, 6, 6)
    per_group, tied = _compare_with_tied(model, x, monkeypatch, allow_approximate=True)
    assert per_group.params_after == tied.params_after
    assert _kept_importance(per_group) > _kept_importance(tied)
    per_group.apply()
    assert model.norm.num_groups == 4 and model.norm.num_channels == 8
    model(x)  # runs
