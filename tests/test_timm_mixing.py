"""timm's gated, head-mixing and cross-covariance attentions (ConViT, CaiT, XCiT): whole heads,
with their per-head parameters, removed exactly through same-maths subclasses."""


import pytest
import torch

import pangkas
from pangkas.integrations.timm import mixing
from pangkas.oracle import oracle_error, randomize

from helpers.round_trips import assert_pickles

timm = pytest.importorskip("timm")

SMALL = {  # two attention blocks of each kind the model has, 2x2 or 4x4 patches
    "convit_tiny": dict(img_size=32, patch_size=8, depth=2, local_up_to_layer=1),
    "cait_xxs24_224": dict(img_size=32, patch_size=8, depth=2, depth_token_only=1),
    "xcit_nano_12_p16_224": dict(img_size=32, depth=2),
}
KINDS = {"convit_tiny": ("GPSA", "MHSA"), "cait_xxs24_224": ("TalkingHeadAttn", "ClassAttn"),
         "xcit_nano_12_p16_224": ("XCA", "ClassAttn")}


def small(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **SMALL[name])
    return randomize(model.eval()), torch.randn(2, 3, 32, 32)


def attentions(model):
    return [m for m in model.modules() if mixing.kind(m) is not None]


def set_fused(model, fused: bool):
    for m in attentions(model):
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name", list(SMALL))
def test_subclass_computes_what_timm_computes(name, fused):
    model, x = small(name)
    set_fused(model, fused)
    want = model(x)
    found = attentions(model)
    assert sorted({type(m).__name__ for m in found}) == sorted(KINDS[name])
    for m in found:
        m.__class__ = mixing.SUBCLASSES(mixing._base(m))
    torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)


def _per_head_sizes(m):
    """Every per-head count the module holds, with its head count."""
    sizes = {"num_heads": m.num_heads, "heads": mixing.kind(m).heads(m), "head_dim": mixing.kind(m).head_dim(m)}
    for name in ("gating_param", "temperature"):
        if hasattr(m, name):
            sizes[name] = getattr(m, name).shape[0]
    if hasattr(m, "pos_proj"):
        sizes["pos_proj"] = m.pos_proj.out_features
    if hasattr(m, "proj_l"):
        sizes["proj_l in"], sizes["proj_w out"] = m.proj_l.in_features, m.proj_w.out_features
    return sizes


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name", list(SMALL))
def test_heads_go_whole_and_exactly(name, fused):
    model, x = small(name)
    set_fused(model, fused)
    dims = [mixing.kind(m).head_dim(m) for m in attentions(model)]
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert error <= 1e-5
    pruned = attentions(plan.model)
    assert all(type(m).__name__.startswith("HeadPrunable") for m in pruned)
    for m, head_dim in zip(pruned, dims):
        sizes = _per_head_sizes(m)
        assert set(sizes.values()) - {head_dim} == {2}, sizes  # 4 heads -> 2, each still head_dim wide
        assert sizes["head_dim"] == head_dim
    assert plan.model(x).shape == (2, 10)


def test_talking_heads_lose_mixed_heads_of_their_own():
    """proj_l's rows / proj_w's columns (the softmaxed mixtures) are a width apart from the heads."""
    model, x = small("cait_xxs24_224")
    pangkas.prune_channels(model, x, ratio=0.5)
    for m in model.modules():
        if hasattr(m, "proj_l"):
            assert (m.proj_l.out_features, m.proj_w.in_features) == (2, 2)


@pytest.mark.parametrize("name", list(SMALL))
def test_pruned_model_round_trips_saves_and_pickles(name, tmp_path):
    model, x = small(name)
    pangkas.prune_channels(model, x, ratio=0.5)
    fresh = pangkas.load(pangkas.save(model, tmp_path / "m.safetensors"), small(name)[0])
    assert all(type(m).__name__.startswith("HeadPrunable") for m in attentions(fresh))
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert_pickles(model, x)


@pytest.mark.parametrize("name", list(SMALL))
def test_pruning_a_pruned_model_again_stays_exact(name):
    model, x = small(name)
    pangkas.prune_channels(model, x, ratio=0.5)
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert error <= 1e-5
    heads = [m.num_heads for m in attentions(plan.model)]
    assert max(heads) <= 2 and 1 in heads


def test_convit_run_before_pruning_keeps_its_position_features():
    """GPSA caches its relative positions as a buffer on first run; pos_proj's 3 inputs stay."""
    model, x = small("convit_tiny")
    model(x)
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert error <= 1e-5
    gpsa = [m for m in attentions(plan.model) if hasattr(m, "pos_proj")]
    assert gpsa and all(m.pos_proj.in_features == 3 and m.num_heads == 2 for m in gpsa)


@pytest.mark.parametrize("name", list(SMALL))
def test_input_width_cut_without_losing_heads_still_runs(name):
    """Approximate pruning may narrow the width the attention reads while heads stay: timm's code
    would then derive a wrong head size, so the module takes the subclass too."""
    model, x = small(name)
    pangkas.prune_channels(model, x, ratio=0.3, allow_approximate=True, ratios={"*attn.[qkv]*": 0.0})
    found = attentions(model)
    assert {m.num_heads for m in found} == {4}
    assert all(mixing.kind(m).width(m) < 4 * mixing.kind(m).head_dim(m) for m in found)
    assert all(type(m).__name__.startswith("HeadPrunable") for m in found)
    assert model(x).shape == (2, 10)
