"""torchvision's Swin window attention: whole heads removed through a same-maths subclass."""


import pytest
import torch

import pangkas
from pangkas.integrations import swin
from pangkas.oracle import oracle_error, randomize

from helpers.round_trips import assert_pickles

swin_transformer = pytest.importorskip("torchvision.models.swin_transformer")


def small_swin(v2: bool):
    torch.manual_seed(0)
    extra = dict(block=swin_transformer.SwinTransformerBlockV2,
                 downsample_layer=swin_transformer.PatchMergingV2) if v2 else {}
    return randomize(swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
        stochastic_depth_prob=0.0, num_classes=10, **extra).eval())


def attentions(model):
    return [m for m in model.modules() if isinstance(m, swin_transformer.ShiftedWindowAttention)]


@pytest.mark.parametrize("v2", [False, True])
def test_subclass_computes_what_torchvision_computes(v2):
    model = small_swin(v2)
    x = torch.randn(2, 3, 36, 44)  # 9x11 patches: padded to whole windows, then shifted
    want = model(x)
    for m in attentions(model):
        m.__class__ = swin.SUBCLASSES(f"{swin.SWIN}.{type(m).__name__}")
    torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("v2", [False, True])
def test_heads_go_whole_and_exactly(v2):
    model, x = small_swin(v2), torch.randn(2, 3, 36, 44)
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert error <= 1e-5
    pruned = attentions(plan.model)
    assert [m.num_heads for m in pruned] == [1, 1, 2, 2]
    assert all(type(m).__name__.startswith("HeadPrunable") for m in pruned)
    assert all(m.qkv.out_features == 3 * m.num_heads * 12 for m in pruned)  # head_dim 12 kept
    assert all(type(m).__module__ == swin_transformer.__name__ for m in attentions(model))


def test_pruned_swin_round_trips_saves_and_pickles(tmp_path):
    model, x = small_swin(v2=True), torch.randn(2, 3, 32, 32)
    pangkas.prune_channels(model, x, ratio=0.5)
    fresh = pangkas.load(pangkas.save(model, tmp_path / "swin.safetensors"), small_swin(v2=True))
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert_pickles(model, x)


@pytest.mark.parametrize("v2", [False, True])
def test_hidden_width_cut_without_losing_heads_still_runs(v2):
    """Approximate pruning may narrow the input width while every head stays: torchvision's own
    code would then derive a wrong head size, so the module takes the subclass too."""
    model, x = small_swin(v2), torch.randn(2, 3, 36, 44)
    pangkas.prune_channels(model, x, ratio=0.4, scope="global", allow_approximate=True)
    narrowed = [m for m in attentions(model) if m.qkv.weight.shape[0] != 3 * m.qkv.weight.shape[1]]
    assert narrowed and all(type(m).__name__.startswith("HeadPrunable") for m in narrowed)
    assert model(x).shape == (2, 10)
