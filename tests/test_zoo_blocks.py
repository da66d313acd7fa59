"""Building blocks from the model zoos: small nets of our own, pruned exactly (the oracle) and
really smaller. The timm ones split by a size held in an attribute (the timm integration)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import pangkas
from pangkas.oracle import oracle_error, randomize

timm = pytest.importorskip("timm")
from timm.layers import MixedConv2d, SelectiveKernel  # noqa: E402
from timm.models.cspnet import CrossStage  # noqa: E402
from timm.models.res2net import Bottle2neck  # noqa: E402

# Loaded by path: benchmarks/ is a folder of scripts, not a package to put on sys.path.
_spec = importlib.util.spec_from_file_location(
    "blocks", Path(__file__).resolve().parent.parent / "benchmarks" / "blocks.py")
blocks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(blocks)

EXACT = 1e-5


class Stemmed(nn.Module):
    """stem conv -> ``body`` -> pooled linear head."""

    def __init__(self, body: nn.Module, c_in: int, c_out: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c_in, 3, padding=1), nn.BatchNorm2d(c_in), nn.ReLU())
        self.body = body
        self.head = nn.Linear(c_out, 10)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def res2net():
    # 4 pieces of width 6
    return Stemmed(Bottle2neck(64, 16, scale=4, base_width=26, norm_layer=nn.BatchNorm2d), 64, 64)


def selective_kernel():
    return Stemmed(SelectiveKernel(32, 32), 32, 32)  # input split over a 3x3 and a dilated 3x3 path


def cross_stage():
    stage = CrossStage(32, 32, stride=1, dilation=1, depth=1, block_ratio=0.5, act_layer=nn.ReLU,
                       norm_layer=nn.BatchNorm2d)
    return Stemmed(stage, 32, 32)  # splits 32 into 16 + 16


def mixed_conv():
    return Stemmed(MixedConv2d(16, 16, kernel_size=[3, 5], depthwise=True), 16, 16)  # a 3x3 and a 5x5 on 8 each


def prune_exactly(model, x):
    model = randomize(model).eval()
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert error <= EXACT
    return plan


def test_res2net_pieces_split_by_width_are_pruned_exactly():
    plan = prune_exactly(res2net(), torch.randn(2, 3, 16, 16))
    body = plan.model.body
    assert body.width == 3 and body.convs[0].in_channels == 3  # each piece 6 -> 3
    assert body.conv1.out_channels == 12 and body.conv3.in_channels == 12
    assert plan.macs_after <= 0.35 * plan.macs_before and not plan.retried


def test_selective_kernel_split_input_is_pruned_exactly():
    plan = prune_exactly(selective_kernel(), torch.randn(2, 3, 16, 16))
    body = plan.model.body
    assert body.in_channels == 16 and [p.conv.in_channels for p in body.paths] == [8, 8]
    assert body.out_channels == 16 and body.attn.fc_select.out_channels == 32
    assert plan.macs_after <= 0.35 * plan.macs_before and not plan.retried


def test_cross_stage_split_by_expand_chs_is_pruned_exactly():
    plan = prune_exactly(cross_stage(), torch.randn(2, 3, 16, 16))
    body = plan.model.body
    assert body.expand_chs == 16 and body.conv_exp.conv.out_channels == 16
    assert plan.macs_after <= 0.35 * plan.macs_before and not plan.retried


def test_mixed_conv_pieces_are_pruned_exactly_each_its_own():
    plan = prune_exactly(mixed_conv(), torch.randn(2, 3, 16, 16))
    body = plan.model.body
    assert body.splits == [conv.in_channels for conv in body.values()] and sum(body.splits) == 8
    assert body.in_channels == body.out_channels == 8
    assert plan.macs_after <= 0.55 * plan.macs_before and not plan.retried  # depthwise: linear in width


def test_a_reverted_cut_restores_the_split_sizes():
    model, x = randomize(res2net()).eval(), torch.randn(2, 3, 16, 16)
    expected = model(x)
    plan = pangkas.plan_channels(model, x, ratio=0.5)
    _, revert = plan._apply()
    assert model.body.width == 3
    revert()
    assert model.body.width == 6 and model.body.convs[0].in_channels == 6
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(blocks.BLOCKS))
def test_block_nets_prune_exactly(name):
    model, x = blocks.BLOCKS[name]()
    plan = prune_exactly(model, x)
    assert plan.macs_after <= 0.6 * plan.macs_before


# -- timm attention: whole heads ---------------------------------------------------------------

def test_timm_vision_transformer_loses_whole_heads_exactly():
    model = randomize(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2)).eval()
    x = torch.randn(2, 3, 32, 32)
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert error <= EXACT and not plan.retried
    attn = plan.model.blocks[0].attn
    assert (attn.num_heads, attn.head_dim, attn.attn_dim) == (1, 64, 64)  # 3 heads of 64: 2 go
    assert attn.qkv.out_features == 3 * 64 and attn.proj.in_features == 64
    assert plan.macs_after <= 0.6 * plan.macs_before


def test_timm_attention_deriving_head_dim_from_the_width_loses_heads_through_its_subclass():
    """convit computes head_dim as C // num_heads from its input: fewer heads run only through the
    subclass of integrations/timm/mixing.py (tests/test_timm_mixing.py covers the family)."""
    model = randomize(timm.create_model("convit_tiny", img_size=32, depth=2, local_up_to_layer=1)).eval()
    x = torch.randn(1, 3, 32, 32)
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert error <= EXACT
    attn = plan.model.blocks[1].attn
    assert type(attn).__name__ == "HeadPrunableMHSA"
    assert attn.num_heads == 2 and attn.qkv.out_features == 3 * 2 * 48
