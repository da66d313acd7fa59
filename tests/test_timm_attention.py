"""timm attention whose forward reshapes to the input width or adds a per-head bias (BEiT, EVA,
PVT-v2, Twins, MaxViT and CoAtNet's maxxvit attention): whole heads removed exactly through
same-maths subclasses (integrations/timm/attention.py)."""

import copy
import io

import pytest
import torch

import pangkas
from pangkas.integrations.timm import attention
from pangkas.oracle import oracle_error, randomize

timm = pytest.importorskip("timm")

EXACT = 1e-5


SMALL = dict(depth=2, embed_dim=64, num_heads=4, num_classes=10)


def beit():  # relative-position bias table per layer, q/v biases: 4 heads of 16
    return timm.create_model("beit_base_patch16_224", img_size=32, **SMALL), 32


def beit_shared_bias():  # one bias table for all layers: their heads go together
    return timm.create_model("beit_base_patch16_224", img_size=32, use_rel_pos_bias=False,
                             use_shared_rel_pos_bias=True, **SMALL), 32


def eva():  # rotary embeddings, fused qkv with q/v biases, SwiGLU MLP: 4 heads of 16
    return timm.create_model("eva02_tiny_patch14_224", img_size=28, **SMALL), 28


def eva_separate_projections():
    return timm.create_model("eva02_tiny_patch14_224", img_size=28, qkv_fused=False, **SMALL), 28


def pvt_v2(linear=False):  # q and kv apart, keys/values from a reduced map; heads 1, 2, 4, 4 of 16 and 32
    return timm.create_model("pvt_v2_b0", embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 4),
                             depths=(1, 1, 1, 1), linear=linear, num_classes=10), 64


def twins():  # PVT's attention as Twins-PCPVT has it (head_dim only in its scale): heads 1, 2, 4, 4
    return timm.create_model("twins_pcpvt_small", embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 4),
                             depths=(1, 1, 1, 1), num_classes=10), 64


def maxxvit(name, **options):  # 64x64 inputs, windows and grids of 2x2; heads of 8: 2, 4, 8, 8 (CoAtNet: 4, 8)
    return timm.create_model(name, img_size=64, embed_dim=(16, 32, 64, 64), depths=(1, 1, 1, 1), stem_width=16,
                             transformer_dim_head=8, num_classes=10, **options), 64


MODELS = {"beit": beit, "beit_shared_bias": beit_shared_bias, "eva": eva,
          "eva_separate_projections": eva_separate_projections, "pvt_v2": pvt_v2,
          "pvt_v2_linear": lambda: pvt_v2(linear=True), "twins": twins,
          # maxxvit: channels-last (MaxViT) and NCHW (CoAtNet) attention, RelPosBias per head
          "maxvit": lambda: maxxvit("maxvit_nano_rw_256"), "coatnet": lambda: maxxvit("coatnet_nano_rw_224"),
          "maxvit_rel_pos_mlp": lambda: maxxvit("maxvit_nano_rw_256", transformer_rel_pos_type="mlp"),
          "coatnet_heads_last": lambda: maxxvit("coatnet_nano_rw_224", transformer_head_first=False)}
MAXXVIT = ["maxvit", "coatnet", "maxvit_rel_pos_mlp"]


def build(name):
    torch.manual_seed(0)
    model, side = MODELS[name]()
    return randomize(model.eval()), torch.randn(2, 3, side, side)


def attentions(model):
    return [m for m in model.modules() if attention._family(m)]


def maxxvit_attentions(model):  # by timm's classes, not by what the integration knows
    from timm.models.maxxvit import Attention2d, AttentionCl

    return [m for m in model.modules() if isinstance(m, (AttentionCl, Attention2d))]


@pytest.mark.parametrize("name", list(MODELS))
def test_subclass_computes_what_timm_computes(name):
    model, x = build(name)
    want = model(x)
    assert attentions(model)
    for m in attentions(model):
        m.__class__ = attention.SUBCLASSES(attention._family(m))
    torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", ["beit", "maxvit", "coatnet", "coatnet_heads_last"])
def test_unfused_timm_attention_is_the_same_maths(name, fused):
    """timm computes scores by hand where fused attention is off: the subclass matches that too."""
    model, x = build(name)
    assert attentions(model)
    for m in attentions(model):
        m.fused_attn = fused
    want = model(x)
    for m in attentions(model):
        m.__class__ = attention.SUBCLASSES(attention._family(m))
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


def prune(name):
    model, x = build(name)
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert error <= EXACT and not plan.retried
    return plan, x


@pytest.mark.parametrize("name", ["beit", "beit_shared_bias"])
def test_beit_loses_whole_heads_with_their_bias(name):
    plan, x = prune(name)
    for m in attentions(plan.model):
        assert type(m).__name__ == "HeadPrunableBeitAttention" and m.num_heads == 2
        assert m.qkv.out_features == 3 * 2 * 16 and m.proj.in_features == 2 * 16  # head_dim 16 stays
        assert m.q_bias.shape == m.v_bias.shape == m.k_bias.shape == (32,)
        assert m.scale == 16 ** -0.5
        if m.relative_position_bias_table is not None:
            assert m.relative_position_bias_table.shape[1] == 2  # a column per head
    if plan.model.rel_pos_bias is not None:
        assert plan.model.rel_pos_bias.relative_position_bias_table.shape[1] == 2
    assert plan.model(x).shape == (2, 10)


@pytest.mark.parametrize("name", ["eva", "eva_separate_projections"])
def test_eva_loses_whole_heads_under_rotary_embeddings(name):
    plan, x = prune(name)
    for m in attentions(plan.model):
        assert type(m).__name__ == "HeadPrunableEvaAttention"
        assert (m.num_heads, m.head_dim) == (2, 16)
        assert m.proj.in_features == 32
        assert (m.q_bias if m.qkv is not None else m.q_proj.bias).shape == (32,)
        assert m.k_bias is None or m.k_bias.shape == (32,)


@pytest.mark.parametrize("name", MAXXVIT)
def test_maxxvit_loses_whole_heads_with_their_relative_position_bias(name):
    """Each head's q, k, v (side by side in the projection), its bias column (RelPosBias) or MLP
    output (RelPosMlp) and its output-projection columns go together; head size 8 stays, so timm's
    own forward runs the pruned module once num_heads and the bias shape follow."""
    plan, x = prune(name)
    pruned = maxxvit_attentions(plan.model)
    dense = [m.num_heads for m in maxxvit_attentions(build(name)[0])]
    assert pruned and [m.num_heads for m in pruned] == [n // 2 for n in dense]
    for m in pruned:
        assert type(m).__module__ == "timm.models.maxxvit" and (m.dim_head, m.scale) == (8, 8 ** -0.5)
        assert m.qkv.weight.shape[0] == 3 * 8 * m.num_heads and m.proj.weight.shape[1] == 8 * m.num_heads
        bias = m.rel_pos.get_bias()
        assert bias.shape[1] == m.rel_pos.bias_shape[-1] == m.num_heads
    assert plan.model(x).shape == (2, 10)


@pytest.mark.parametrize("name", ["maxvit", "coatnet"])
def test_pruned_maxxvit_round_trips(name, tmp_path):
    """load replays the cut; the fixer sets num_heads and the bias shape again."""
    model, x = build(name)
    original = copy.deepcopy(model)
    dense = sum(m.num_heads for m in maxxvit_attentions(model))
    pangkas.prune_channels(model, x, ratio=0.5)
    fresh = pangkas.load(pangkas.save(model, tmp_path / "pruned.safetensors"), original)
    heads = [m.num_heads for m in maxxvit_attentions(model)]
    assert heads and sum(heads) < dense
    assert [m.num_heads for m in maxxvit_attentions(fresh)] == heads
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_pvt_v2_separate_query_and_key_value_projections_lose_whole_heads():
    plan, x = prune("pvt_v2")
    pruned = attentions(plan.model)
    assert [m.num_heads for m in pruned] == [1, 1, 2, 2]  # 1 head stays; 2 -> 1; 4 -> 2
    assert [m.head_dim for m in pruned] == [16, 16, 16, 32]
    assert all(m.q.out_features == m.num_heads * m.head_dim for m in pruned)
    assert all(m.kv.out_features == 2 * m.q.out_features for m in pruned[1:])
    assert all(type(m).__name__ == "HeadPrunablePvtV2Attention" for m in pruned)
    assert all(m.dim == m.q.in_features for m in pruned)


def test_twins_global_sub_sampled_attention_loses_whole_heads():
    plan, x = prune("twins")
    pruned = attentions(plan.model)
    assert [m.num_heads for m in pruned] == [1, 1, 2, 2]
    assert [m.q.out_features for m in pruned] == [16, 16, 32, 64]
    assert [m.scale for m in pruned] == [16 ** -0.5] * 3 + [32 ** -0.5]  # head sizes 16, 16, 16, 32 kept
    assert plan.model(x).shape == (2, 10)


def test_a_single_head_loses_value_dims_and_keeps_query_key_dims():
    """PVT-v2's first stage has one head: its values' dims reach only the output projection
    (exact to remove); its queries' and keys' dims change the scores (kept)."""
    plan, x = prune("pvt_v2")
    first = attentions(plan.model)[0]
    assert (first.num_heads, first.head_dim, first.scale) == (1, 16, 16 ** -0.5)
    assert first.q.out_features == 16 and first.kv.out_features == 16 + 8 and first.proj.in_features == 8
    assert any("attention scores over head dims" in why for why in plan.blocked())
    assert plan.model(x).shape == (2, 10)


def test_pruned_models_round_trip_saves_and_pickles(tmp_path):
    for name in ("beit", "eva", "pvt_v2"):
        model, x = build(name)
        original = copy.deepcopy(model)
        pangkas.prune_channels(model, x, ratio=0.5)
        assert any(type(m).__module__ == attention.__name__ for m in model.modules())
        fresh = pangkas.load(pangkas.save(model, tmp_path / f"{name}.safetensors"), original)
        assert [type(m) for m in attentions(fresh)] == [type(m) for m in attentions(model)]
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), model(x), rtol=0, atol=0)


def test_a_reverted_cut_restores_class_and_sizes():
    model, x = build("pvt_v2")
    expected = model(x)
    plan = pangkas.plan_channels(model, x, ratio=0.5)
    _, revert = plan._apply()
    assert attentions(model)[3].num_heads == 2
    revert()
    assert [(type(m).__name__, m.num_heads) for m in attentions(model)] == [("Attention", n) for n in (1, 2, 4, 4)]
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["beit", "pvt_v2"])
def test_approximate_cuts_still_run(name):
    """Approximate pruning may narrow the input width while heads stay, or a single head's
    query/key dims: timm's own forward would reshape to the new width or derive another scale,
    so those modules take the subclass."""
    model, x = build(name)
    pangkas.prune_channels(model, x, ratio=0.4, scope="global", allow_approximate=True)
    changed = [m for m in attentions(model) if not attention._runs_as_timm(m, *attention._sizes(m))]
    assert changed and all(type(m).__module__ == attention.__name__ for m in changed)
    assert model(x).shape == (2, 10)
