"""Planning never changes the model (plan_channels, plan_layers, sensitivity, a failed apply), and a
module registered under two names or in two parents is pruned once, the same for every call."""

import pytest
import torch
from torch import nn

import pangkas
from pangkas import verify
from pangkas.oracle import oracle_error, randomize
from pangkas.surgery import attributes

import nets
from helpers.model_state import changes, snapshot

EXACT = 1e-5
IMAGES = torch.Size([2, 3, 8, 8])


# -- shared modules ------------------------------------------------------------------------------

class SharedConv(nn.Module):
    """A positional conv registered as ``pos`` and ``pos_again`` (as some vision transformers do),
    called at both names, or at one only."""

    def __init__(self, call_both: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pos_again = self.pos
        self.mix = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)
        self.call_both = call_both

    def forward(self, x):
        x = self.stem(x)
        x = x + self.pos(x)
        x = torch.relu(self.mix(x))
        if self.call_both:
            x = x + self.pos_again(x)
        return self.head(x)


class SharedLinear(nn.Module):
    """One Linear applied to two inputs at two names: its hidden units go for both at once."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(6, 16)
        self.up_other = self.up
        self.down = nn.Linear(16, 5)
        self.side = nn.Linear(16, 5)

    def forward(self, a, b):
        return self.down(torch.relu(self.up(a))) + self.side(torch.relu(self.up_other(b)))


class SharedNorm(nn.Module):
    """One BatchNorm after two convs: both convs' channels are tied through its statistics."""

    def __init__(self):
        super().__init__()
        self.left = nn.Conv2d(3, 8, 3, padding=1)
        self.right = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.norm = self.bn
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        a = torch.relu(self.bn(self.left(x)))
        b = torch.relu(self.norm(self.right(x)))
        return self.head(torch.cat([a, b], 1).mean((2, 3)))


class Block(nn.Module):
    def __init__(self, pos: nn.Module):
        super().__init__()
        self.pos = pos
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x + self.pos(x)))


class SharedAcrossParents(nn.Module):
    """One conv inside two blocks (``first.pos`` and ``second.pos``)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        shared = nn.Conv2d(8, 8, 1)
        self.first, self.second = Block(shared), Block(shared)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.second(self.first(self.stem(x))).mean((2, 3)))


SHARED = {  # name: (build, example inputs, the shared module's two names)
    "conv_called_twice": (lambda: SharedConv(True), torch.randn(IMAGES), ("pos", "pos_again")),
    "conv_called_once": (lambda: SharedConv(False), torch.randn(IMAGES), ("pos", "pos_again")),
    "linear": (SharedLinear, (torch.randn(3, 6), torch.randn(3, 6)), ("up", "up_other")),
    "batch_norm": (SharedNorm, torch.randn(IMAGES), ("bn", "norm")),
    "across_parents": (SharedAcrossParents, torch.randn(IMAGES), ("first.pos", "second.pos")),
}


def _devices(model):
    return {n: t.device.type for n, t in [*model.named_parameters(remove_duplicate=False),
                                           *model.named_buffers(remove_duplicate=False)]}


@pytest.mark.parametrize("name", SHARED)
def test_planning_leaves_a_shared_module_on_its_device(name):
    build, x, _ = SHARED[name]
    model = build()
    before = snapshot(model)
    pangkas.plan_channels(model, x, ratio=0.5)
    assert set(_devices(model).values()) == {"cpu"}, _devices(model)
    assert changes(model, before) == []


@pytest.mark.parametrize("name", SHARED)
def test_shared_module_is_pruned_once_for_every_call(name):
    build, x, (first, second) = SHARED[name]
    model = randomize(build()).eval()
    widths = {n: p.shape for n, p in model.named_parameters(remove_duplicate=False) if n.startswith(first + ".")}
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    pruned = plan.model
    assert error <= EXACT, (error, str(plan))
    shared = pruned.get_submodule(first)
    assert shared is pruned.get_submodule(second)
    assert any(p.shape != widths[f"{first}.{n}"] for n, p in shared.named_parameters()), str(plan)
    measured = pangkas.measure(pruned, x, latency=False)
    assert plan.params_before == sum(p.numel() for p in model.parameters())  # each tensor once
    assert (plan.params_after, plan.macs_after) == (measured.params, measured.macs)
    assert second not in str(plan), "the plan lists a shared module under one name"


# -- a model from every zoo: nothing changes -------------------------------------------------------
