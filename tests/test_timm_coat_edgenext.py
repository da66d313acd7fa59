"""CoaT's factorised attention (with the convolutional position encoding a stage's blocks share)
and EdgeNeXt's cross-covariance attention: whole heads removed exactly through same-maths
subclasses, the pruned models run as themselves, save and load."""

import pytest
import torch

import pangkas
from pangkas.integrations.timm import mixing
from pangkas.oracle import oracle_error, randomize

from helpers.round_trips import assert_pickles

timm = pytest.importorskip("timm")

SMALL = {  # 8 heads of 2..8 in CoaT (two blocks share each stage's crpe); 4 heads of 2..8 in EdgeNeXt
    "coat_lite_tiny": dict(img_size=32, embed_dims=(16, 32, 48, 64), serial_depths=(2, 2, 1, 1)),
    "edgenext_xx_small": dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)),
}
KIND = {"coat_lite_tiny": "FactorAttnConvRelPosEnc", "edgenext_xx_small": "CrossCovarianceAttn"}


def small(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **SMALL[name])
    return randomize(model.eval()), torch.randn(2, 3, 32, 32)


def attentions(model):
    return [m for m in model.modules() if mixing.kind(m) is not None]


@pytest.mark.parametrize("name", list(SMALL))
def test_subclass_computes_what_timm_computes(name):
    model, x = small(name)
    want = model(x)
    found = attentions(model)
    assert found and {type(m).__name__ for m in found} == {KIND[name]}
    for m in found:
        m.__class__ = mixing.SUBCLASSES(mixing._base(m))
    torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)


def _check_heads(m, head_dim, heads_before):
    k = mixing.kind(m)
    assert type(m).__name__ == f"HeadPrunable{type(m).__base__.__name__}"
    assert k.head_dim(m) == head_dim and m.num_heads == k.heads(m) < heads_before
    assert m.qkv.out_features == 3 * m.num_heads * head_dim == 3 * m.proj.in_features
    if hasattr(m, "temperature"):
        assert m.temperature.shape[0] == m.num_heads
    if hasattr(m, "crpe"):  # the position encoding's window pieces lost whole heads too
        assert sum(m.crpe.channel_splits) == m.num_heads * head_dim
        assert all(s % head_dim == 0 for s in m.crpe.channel_splits)
        assert m.crpe.channel_splits == [c.in_channels for c in m.crpe.conv_list]


@pytest.mark.parametrize("name", list(SMALL))
def test_heads_go_whole_and_exactly(name):
    model, x = small(name)
    before = [(mixing.kind(m).head_dim(m), m.num_heads) for m in attentions(model)]
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert error <= 1e-5
    pruned = attentions(plan.model)
    assert len(pruned) == len(before) > 0
    for m, (head_dim, heads) in zip(pruned, before):
        _check_heads(m, head_dim, heads)
    assert plan.model(x).shape == (2, 10)  # runs as itself


def test_coat_blocks_sharing_a_position_encoding_lose_the_same_heads():
    model, x = small("coat_lite_tiny")
    pangkas.prune_channels(model, x, ratio=0.5)
    for stage in (model.serial_blocks1, model.serial_blocks2):
        a, b = (block.factoratt_crpe for block in stage)
        assert a.crpe is b.crpe and a.num_heads == b.num_heads < 8
    assert model(x).shape == (2, 10)


@pytest.mark.parametrize("name", list(SMALL))
def test_pruned_model_round_trips_saves_and_pickles(name, tmp_path):
    model, x = small(name)
    pangkas.prune_channels(model, x, ratio=0.5)
    fresh = pangkas.load(pangkas.save(model, tmp_path / "m.safetensors"), small(name)[0])
    heads = [m.num_heads for m in attentions(model)]
    assert heads and max(heads) < 8 and [m.num_heads for m in attentions(fresh)] == heads
    assert all(type(m).__name__.startswith("HeadPrunable") for m in attentions(fresh))
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert_pickles(model, x)


@pytest.mark.parametrize("name", list(SMALL))
def test_pruning_a_pruned_model_again_stays_exact(name):
    model, x = small(name)
    pangkas.prune_channels(model, x, ratio=0.5)
    heads = [m.num_heads for m in attentions(model)]
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert error <= 1e-5
    assert sum(m.num_heads for m in attentions(plan.model)) < sum(heads)
    assert plan.model(x).shape == (2, 10)
