"""nn.MultiheadAttention: whole heads removed through HeadPrunable, exactly."""

import copy

import pytest
import torch
from torch import nn

import pangkas
from pangkas.integrations.multihead_attention import HeadPrunable
from pangkas.oracle import oracle_error, randomize

torchvision = pytest.importorskip("torchvision")


def small_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return randomize(VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                       hidden_dim=64, mlp_dim=128).eval())


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("options", [
    dict(need_weights=False), dict(), dict(average_attn_weights=False), dict(key_padding_mask="padding"),
    dict(attn_mask="float"), dict(attn_mask="bool", key_padding_mask="padding"),
])
def test_head_prunable_is_multihead_attention(batch_first, options):
    torch.manual_seed(0)
    m = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    h = copy.deepcopy(m)
    h.__class__ = HeadPrunable
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    masks = {"padding": torch.tensor([[False] * 4 + [True], [False] * 5]),
             "float": torch.randn(5, 5), "bool": torch.rand(5, 5) > 0.7}
    options = {k: masks.get(v, v) if isinstance(v, str) else v for k, v in options.items()}
    for want, got in zip(m(x, x, x, **options), h(x, x, x, **options)):
        assert (want is None) == (got is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    y = torch.randn(5, 16)  # unbatched
    torch.testing.assert_close(h(y, y, y)[0], m(y, y, y)[0], rtol=1e-6, atol=1e-6)


def test_vit_heads_go_whole_and_exactly():
    vit, x = small_vit(), torch.randn(2, 3, 32, 32)
    error, plan = oracle_error(vit, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert error <= 1e-5
    attention = plan.model.encoder.layers[0].self_attention
    assert type(attention) is HeadPrunable and attention.num_heads == 2 and attention.head_dim == 16
    assert attention.in_proj_weight.shape == (3 * 32, 64) and attention.out_proj.in_features == 32
    assert type(vit.encoder.layers[0].self_attention) is nn.MultiheadAttention  # the original is left alone


def test_pruned_vit_round_trips_through_a_fresh_instance(tmp_path):
    vit, x = small_vit(), torch.randn(2, 3, 32, 32)
    pangkas.prune_channels(vit, x, ratio=0.5)
    path = pangkas.save(vit, tmp_path / "vit.safetensors")
    fresh = pangkas.load(path, small_vit())
    assert type(fresh.encoder.layers[1].self_attention) is HeadPrunable
    torch.testing.assert_close(fresh(x), vit(x), rtol=0, atol=0)


def test_what_it_does_not_cover_keeps_its_channels():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(16, 4, kdim=8, vdim=8, batch_first=True)
            self.head = nn.Linear(16, 2)

        def forward(self, x, memory):
            return self.head(self.attention(x, memory, memory)[0])

    model = randomize(Cross().eval())
    x = (torch.randn(2, 5, 16), torch.randn(2, 3, 8))
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    attention = plan.model.attention  # separate q/k/v weights: heads stay (out_proj's outputs may go)
    assert error <= 1e-5 and type(attention) is nn.MultiheadAttention and attention.q_proj_weight.shape == (16, 16)


def test_per_head_masks_after_pruning_are_refused():
    vit, x = small_vit(), torch.randn(2, 3, 32, 32)
    pangkas.prune_channels(vit, x, ratio=0.5)
    attention, y = vit.encoder.layers[0].self_attention, torch.randn(2, 5, 64)
    with pytest.raises(pangkas.PangkasError, match="per-head"):
        attention(y, y, y, attn_mask=torch.zeros(2 * 2, 5, 5))


def test_undo_gives_back_the_original_class():
    from pangkas.surgery import shrink

    vit, x = small_vit(), torch.randn(2, 3, 32, 32)
    want = vit(x)
    known = pangkas.integrations.active()
    undo = shrink(vit, pangkas.plan_channels(vit, x, ratio=0.5).keep(), known.updater_for, known.fix)
    assert type(vit.encoder.layers[0].self_attention) is HeadPrunable
    undo.restore()
    attention = vit.encoder.layers[0].self_attention
    assert type(attention) is nn.MultiheadAttention and attention.num_heads == 4
    torch.testing.assert_close(vit(x), want, rtol=0, atol=0)
