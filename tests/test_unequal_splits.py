"""Splits into unequal pieces whose sizes live in an attribute the model family recomputes after
the cut (an integration's ``splits=`` and a fixer): each piece loses channels of its own, exactly.
Without that knowledge the sizes are constants to the trace and the pieces keep their channels."""

import pytest
import torch
from torch import nn

import pangkas
from pangkas.integrations import Integration
from pangkas.oracle import oracle_error, randomize

EXACT = 1e-5


class Pieces(nn.Module):
    """A projection split at ``self.sizes`` (5 + 7), each piece through its own linear."""

    def __init__(self):
        super().__init__()
        self.inp, self.a, self.b, self.out = nn.Linear(8, 12), nn.Linear(5, 6), nn.Linear(7, 6), nn.Linear(12, 3)
        self.sizes = [5, 7]

    def forward(self, x):
        a, b = torch.split(torch.relu(self.inp(x)), self.sizes, dim=-1)
        return self.out(torch.cat([self.a(a), self.b(b)], -1))


def _pieces_modules(model):
    return [name for name, m in model.named_modules() if isinstance(m, Pieces)]


def _fix_pieces(model, undo):
    for m in model.modules():
        if isinstance(m, Pieces):
            undo.remember(m, ("sizes",))
            m.sizes = [m.a.in_features, m.b.in_features]


PIECES = Integration("pieces", splits=_pieces_modules, fixers=[_fix_pieces])


def pieces():
    torch.manual_seed(0)
    return randomize(Pieces().eval()), torch.randn(4, 8)


def test_unequal_pieces_whose_sizes_follow_lose_their_own_channels_exactly():
    model, x = pieces()
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5, integrations=[PIECES]))
    pruned = plan.model
    assert error <= EXACT and not plan.retried
    assert pruned.inp.out_features == 6 and pruned.sizes == [pruned.a.in_features, pruned.b.in_features]
    assert 0 < pruned.a.in_features < 5 or 0 < pruned.b.in_features < 7
    assert pruned(x).shape == (4, 3) and model.sizes == [5, 7]  # the original is left alone


def test_without_the_family_unequal_pieces_keep_their_channels():
    model, x = pieces()
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert error <= EXACT and plan.model.inp.out_features == 12 and plan.model.sizes == [5, 7]
    assert any("split into unequal pieces" in why for why in plan.blocked())


def test_sizes_that_do_not_follow_are_caught_by_the_surgery_check():
    model, x = pieces()
    careless = Integration("careless", splits=_pieces_modules)  # claims the sizes follow, fixes nothing
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5, integrations=[careless]))
    assert error <= EXACT and plan.retried and plan.model.sizes == [5, 7]


def test_pruned_pieces_save_and_load_into_a_fresh_instance(tmp_path):
    model, x = pieces()
    pangkas.prune_channels(model, x, ratio=0.5, integrations=[PIECES])
    path = pangkas.save(model, tmp_path / "pieces.safetensors")
    loaded = pangkas.load(path, pieces()[0], integrations=[PIECES])
    assert loaded.sizes == model.sizes
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_a_bad_splits_function_is_refused():
    with pytest.raises(pangkas.PangkasError, match="splits"):
        Integration("x", splits=[])


# -- timm ------------------------------------------------------------------------------------

timm = pytest.importorskip("timm")
from timm.layers import MixedConv2d  # noqa: E402
from timm.models.coat import ConvRelPosEnc  # noqa: E402


class Stemmed(nn.Module):
    """stem conv -> ``body`` -> pooled linear head."""

    def __init__(self, body: nn.Module, c_in: int, c_out: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c_in, 3, padding=1), nn.BatchNorm2d(c_in), nn.ReLU())
        self.body, self.head = body, nn.Linear(c_out, 10)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


class PositionEncoded(nn.Module):
    """CoaT's convolutional position encoding of v (3 heads of 4: one head under a 3x3 window,
    two under a 5x5, so v splits into 4 + 8) multiplied into q."""

    def __init__(self, heads=3, head_chs=4):
        super().__init__()
        self.heads, self.head_chs = heads, head_chs
        self.q, self.v = nn.Linear(8, heads * head_chs), nn.Linear(8, heads * head_chs)
        self.crpe = ConvRelPosEnc(head_chs, heads, {3: 1, 5: 2})
        self.out = nn.Linear(heads * head_chs, 2)

    def forward(self, x):  # (B, 1 + 4 * 4, 8)
        b, n, _ = x.shape
        q, v = (f(x).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.q, self.v))
        return self.out(self.crpe(q, v, (4, 4)).transpose(1, 2).reshape(b, n, -1))


def prune_exactly(model, x):
    model = randomize(model).eval()
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert error <= EXACT and not plan.retried
    plan.model(x)  # runs as itself
    return plan


def test_mambaout_gated_conv_block_prunes_its_gate_identity_and_conv_pieces():
    torch.manual_seed(0)
    model = timm.create_model("mambaout_femto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=10)
    plan = prune_exactly(model, torch.randn(1, 3, 32, 32))
    blocks = [m for m in plan.model.modules() if type(m).__name__ == "GatedConvBlock"]
    for block, dim in zip(blocks, (8, 16, 24, 32)):
        hidden, identity, conv = block.split_indices
        assert hidden < int(8 / 3 * dim) and conv < dim  # every piece lost channels
        assert block.fc1.out_features == 2 * hidden and block.fc2.in_features == hidden  # gate * value tied
        assert identity + conv == hidden and block.conv.in_channels == conv
    assert plan.macs_after <= 0.8 * plan.macs_before  # unpruned before (1.0): the stem dominates at 32x32


def test_pruned_mambaout_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    make = lambda: timm.create_model("mambaout_femto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),  # noqa: E731
                                     num_classes=10).eval()
    model, x = randomize(make()), torch.randn(1, 3, 32, 32)
    pangkas.prune_channels(model, x, ratio=0.5)
    assert model.stages[0].blocks[0].split_indices != (21, 13, 8)  # int(8 / 3 * 8), minus the conv's 8
    loaded = pangkas.load(pangkas.save(model, tmp_path / "mambaout.safetensors"), make())
    assert [b.split_indices for b in loaded.stages.modules() if hasattr(b, "split_indices")] == \
        [b.split_indices for b in model.stages.modules() if hasattr(b, "split_indices")]
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_coat_position_encoding_splits_per_window_follow_the_head_dim():
    torch.manual_seed(0)
    plan = prune_exactly(PositionEncoded(), torch.randn(2, 17, 8))
    crpe = plan.model.crpe
    assert crpe.channel_splits == [2, 4] and [c.in_channels for c in crpe.conv_list] == [2, 4]  # head dim 4 -> 2


def test_mixed_conv_split_into_unequal_pieces_is_pruned_exactly():
    torch.manual_seed(0)
    body = MixedConv2d(10, 10, kernel_size=[3, 5, 7], depthwise=True)
    assert body.splits == [4, 3, 3]
    plan = prune_exactly(Stemmed(body, 10, 10), torch.randn(2, 3, 16, 16))
    body = plan.model.body
    assert body.splits == [conv.in_channels for conv in body.values()] and sum(body.splits) == 5
    assert body.in_channels == body.out_channels == 5
