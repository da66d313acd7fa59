"""timm's weight-standardised convs and global response norm prune exactly (integrations/timm/norms.py)."""

import copy

import pytest
import torch
from torch import nn

import pangkas
from pangkas.oracle import oracle_error, randomize
from pangkas.surgery import shrink

timm = pytest.importorskip("timm")
from timm.layers.grn import GlobalResponseNorm  # noqa: E402
from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame  # noqa: E402

STD_CONVS = (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)


def std_net(cls, groups: int = 1) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(cls(3, 8, 3), nn.ReLU(), cls(8, 8, 3, groups=groups), nn.ReLU(), cls(8, 4, 1))
    return randomize(net).eval()


def grn_net(channels_last: bool) -> nn.Sequential:
    torch.manual_seed(0)
    if channels_last:  # ConvNeXt-V2's MLP on (B, H, W, C)
        net = nn.Sequential(nn.Linear(4, 16), nn.GELU(), GlobalResponseNorm(16), nn.Linear(16, 4))
    else:
        net = nn.Sequential(nn.Conv2d(4, 16, 1), nn.GELU(), GlobalResponseNorm(16, channels_last=False),
                            nn.Conv2d(16, 4, 1))
    return randomize(net).eval()


def grn_input(channels_last: bool) -> torch.Tensor:
    return torch.randn(2, 5, 5, 4) if channels_last else torch.randn(2, 4, 5, 5)


def pruned_exactly(net, x):
    error, plan = oracle_error(net, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert error <= 1e-5
    assert plan.macs_after < 0.7 * plan.macs_before  # before: nothing pruned (1.00 of dense)
    return plan


@pytest.mark.parametrize("cls", STD_CONVS, ids=lambda c: c.__name__)
def test_standardised_convs_lose_input_channels_exactly(cls):
    plan = pruned_exactly(std_net(cls), torch.randn(2, 3, 9, 9))
    assert plan.model[2].in_channels == 4 and plan.model[2].fan_in == 72
    assert type(plan.model[2]).__name__ == f"Prunable{cls.__name__}"


def test_grouped_standardised_conv():
    pruned_exactly(std_net(StdConv2d, groups=2), torch.randn(2, 3, 9, 9))


@pytest.mark.parametrize("channels_last", [True, False])
def test_global_response_norm_loses_channels_exactly(channels_last):
    plan = pruned_exactly(grn_net(channels_last), grn_input(channels_last))
    grn = plan.model[2]
    assert grn.weight.shape == (8,) and grn.original_channels == 16


def test_removed_inputs_keep_their_moments():
    """Pruned without the oracle's zeroing, the conv computes what the dense one computes with the
    removed inputs silenced: its removed taps' sums are kept, not dropped."""
    net, x = std_net(ScaledStdConv2d), torch.randn(2, 3, 9, 9)
    dense = copy.deepcopy(net)
    plan = pangkas.plan_channels(net, x, ratio=0.5)
    kept = plan.keep()["2.weight"][1]
    plan.apply()
    assert plan.model[2].removed_moments.abs().sum() > 0
    hidden = net[:2](x)
    silenced = torch.zeros(2, 8, *hidden.shape[2:])
    silenced[:, kept] = hidden
    want = dense[2](silenced)[:, plan.keep()["2.weight"][0]]
    torch.testing.assert_close(net[2](hidden), want, rtol=1e-5, atol=1e-5)


def test_second_pruning_adds_to_the_moments():
    net, x = std_net(StdConv2d), torch.randn(2, 3, 9, 9)
    pangkas.plan_channels(net, x, ratio=0.25).apply()
    held = net[2].removed_moments.clone()
    assert held.abs().sum() > 0
    plan = pruned_exactly(net, x)  # the oracle on an already pruned model, whose moments are kept
    assert plan.model[2].fan_in == 72 and plan.model[2].removed_moments.shape == (plan.model[2].out_channels, 2)


@pytest.mark.parametrize("make, x", [(lambda: std_net(ScaledStdConv2dSame, groups=2), torch.randn(2, 3, 9, 9)),
                                     (lambda: grn_net(True), grn_input(True))], ids=["std_conv", "grn"])
def test_pruned_model_saves_loads_and_trains(make, x, tmp_path):
    net = make()
    pangkas.plan_channels(net, x, ratio=0.5).apply()
    assert type(net[2]).__name__.startswith("Prunable")
    pangkas.save(net, tmp_path / "pruned.safetensors")
    loaded = pangkas.load(tmp_path / "pruned.safetensors", make())
    assert [type(m) for m in loaded] == [type(m) for m in net]
    assert torch.equal(loaded(x), net(x))
    loaded.train()
    loaded(x).square().mean().backward()
    for name, p in loaded.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_undo_restores_the_timm_classes():
    net, x = std_net(StdConv2d), torch.randn(2, 3, 9, 9)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    plan = pangkas.plan_channels(net, x, ratio=0.5)
    undo = shrink(net, plan.keep(), plan.integrations.updater_for, plan.integrations.fix)
    assert type(net[2]).__name__ == "PrunableStdConv2d" and "2.removed_moments" in net.state_dict()
    undo.restore()
    assert [type(m) for m in net] == [type(m) for m in std_net(StdConv2d)]
    assert not hasattr(net[2], "fan_in") and set(net.state_dict()) == set(state)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("name", ["convnextv2_atto", "nf_resnet26"])
def test_small_timm_models(name):
    model = randomize(timm.create_model(name, pretrained=False, num_classes=10)).eval()
    pruned_exactly(model, torch.randn(1, 3, 64, 64))
