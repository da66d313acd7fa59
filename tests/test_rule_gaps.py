"""Rules for ops the timm zoo met without one: ``Tensor.unfold`` (halo attention's neighbourhoods),
``F.unfold``/``F.fold`` (im2col, col2im) and ``as_strided`` (``adaptive_avg_pool2d`` restrides a
channels-last result in place); oracle-checked on small nets, pruned models run and round-trip."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pangkas
from pangkas.oracle import oracle_error, randomize

EXACT = 1e-5


def _exact(model: nn.Module, x: torch.Tensor, tmp_path) -> nn.Module:
    """Prune half the channels; asserts the oracle holds, no rule gap is left, the pruned model runs
    and survives save/load into a fresh copy of the dense model; returns the pruned model."""
    dense = randomize(model).eval()
    fresh = type(model)().eval()
    error, plan = oracle_error(dense, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert not plan.rule_gaps(), plan.rule_gaps()
    assert plan.channels_removed > 0 and plan.params_after < plan.params_before, str(plan)
    assert error <= EXACT, (error, str(plan))
    pruned = plan.model
    loaded = pangkas.load(pangkas.save(pruned, tmp_path / "pruned.safetensors"), fresh)
    torch.testing.assert_close(loaded(x), pruned(x), rtol=0, atol=0)
    return pruned


def _reasons(model: nn.Module, x: torch.Tensor) -> str:
    return " | ".join(pangkas.plan_channels(model, x, ratio=0.5).blocked())


# -- Tensor.unfold ---------------------------------------------------------------------------

class Neighbourhoods(nn.Module):
    """Halo-attention-like: padded overlapping 4x4 windows (stride 2) of every channel, pooled."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = F.pad(torch.relu(self.a(x)), [1, 1, 1, 1])
        windows = y.unfold(2, 4, 2).unfold(3, 4, 2)   # (n, 16, h', w', 4, 4)
        return self.b(windows.amax((-2, -1)) + windows.mean((-2, -1)))


def test_unfold_of_spatial_dims_passes_the_channels(tmp_path):
    model = _exact(Neighbourhoods(), torch.randn(2, 3, 8, 8), tmp_path)
    assert model.a.out_channels == model.b.in_channels < 16


class UnfoldedChannels(nn.Module):
    """Windows slid along the channel dim itself: a removed channel would shift every window."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4, 10)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        windows = y.mean((2, 3)).unfold(1, 4, 4)   # (n, 2, 4)
        return self.head(windows.flatten(1).repeat(1, 4))


def test_unfold_along_a_channel_dim_keeps_those_channels_and_says_why():
    x = torch.randn(2, 3, 8, 8)
    assert "unfold along a channel dim" in _reasons(UnfoldedChannels(), x)
    error, plan = oracle_error(randomize(UnfoldedChannels()).eval(), x,
                               lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert error <= EXACT and not plan.rule_gaps()
    assert plan.model.b.out_channels == 8 and plan.model.a.out_channels < 16


# -- F.unfold / F.fold (im2col / col2im) -----------------------------------------------------

class Patches(nn.Module):
    """F.unfold into 2x2 patches (channel c -> rows 4c..4c+3), a Linear over them, F.fold back."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Linear(8 * 4, 6 * 4)
        self.b = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        cols = F.unfold(torch.relu(self.a(x)), kernel_size=2, stride=2)        # (n, 32, L)
        mixed = torch.relu(self.mix(cols.transpose(1, 2))).transpose(1, 2)     # (n, 24, L)
        return self.b(F.fold(mixed, x.shape[-2:], kernel_size=2, stride=2))


def test_im2col_and_col2im_move_whole_kernel_blocks(tmp_path):
    model = _exact(Patches(), torch.randn(2, 3, 8, 8), tmp_path)
    assert model.a.out_channels < 8 and model.mix.in_features == 4 * model.a.out_channels
    assert model.b.in_channels < 6 and model.mix.out_features == 4 * model.b.in_channels


# -- as_strided ------------------------------------------------------------------------------

class ChannelsLastHead(nn.Module):
    """A channels-last feature map pooled to 1x1: ATen's adaptive_avg_pool2d takes the mean, then
    restrides it in place (``as_strided_``) to channels-last, moving no element."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.a(x)).contiguous(memory_format=torch.channels_last)
        return self.head(self.pool(y).flatten(1))


def test_a_restride_that_moves_no_element_passes_the_channels(tmp_path):
    model = _exact(ChannelsLastHead(), torch.randn(2, 3, 8, 8), tmp_path)
    assert model.a.out_channels == model.head.in_features < 16


class EveryOtherChannel(nn.Module):
    """``as_strided`` reading every other channel: a real gather, which no rule can follow."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        n, c, h, w = y.shape
        return self.b(y.as_strided((n, c // 2, h, w), (c * h * w, 2 * h * w, w, 1)))


class RestridedInPlace(EveryOtherChannel):
    """``as_strided_`` keeping the sizes but not the strides: channels and columns trade places."""

    def __init__(self):
        super().__init__()
        self.b = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        n, c, h, w = y.shape
        return self.b(y.as_strided_((n, c, h, w), (c * h * w, 1, w * c, c)))   # NCHW data read as NHWC


@pytest.mark.parametrize("net", [EveryOtherChannel, RestridedInPlace])
def test_as_strided_that_moves_elements_keeps_its_channels_and_says_why(net):
    x = torch.randn(2, 3, 16, 16)
    assert "as_strided that moves elements" in _reasons(net(), x)
    error, plan = oracle_error(randomize(net()).eval(), x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert error <= EXACT and not plan.rule_gaps()
    assert plan.model.a.out_channels == 16
