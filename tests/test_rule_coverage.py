"""Op coverage of the coupling rules: in-place, ``out=`` and ``*_copy`` forms follow their
functional op's rule, element-wise ops PyTorch does not tag, pixel (un)shuffle; oracle-checked."""

import pytest
import torch
from torch import nn

import pangkas
from pangkas.graph.rules import RULES, find_rule, pointwise
from pangkas.oracle import oracle_error, randomize

aten = torch.ops.aten
EXACT = 1e-5

# -- every op that should reach a rule does ----------------------------------------------------

# In-place view ops whose shape before cannot be told from the shape after: their channels stay.
UNDERIVABLE = {aten.squeeze_}


def _takes_tensors(func) -> bool:
    return any("Tensor" in str(a.type) for a in func._schema.arguments)


def _overloads(packet):
    return [getattr(packet, name) for name in packet.overloads() if _takes_tensors(getattr(packet, name))]


def _covered_functional_ops():
    """Every overload tagged pointwise, and every overload of a packet with a rule."""
    found = []
    for name in dir(aten):
        packet = getattr(aten, name)
        if isinstance(packet, torch._ops.OpOverloadPacket):
            found += [f for f in _overloads(packet)
                      if not f._schema.is_mutable and (torch.Tag.pointwise in f.tags or packet in RULES)]
    return found


def _mutating_forms(func):
    """``func``'s in-place overload (``foo_``, same overload name) and its ``out=`` overloads (same
    other argument names), found independently of the code under test."""
    names = [a.name for a in func._schema.arguments]
    packet = func.overloadpacket
    in_place = getattr(aten, packet.__name__ + "_", None)
    forms = [f for f in (_overloads(in_place) if in_place else []) if [a.name for a in f._schema.arguments] == names]
    for other in _overloads(packet):
        arguments = other._schema.arguments
        if any(a.is_out for a in arguments) and [a.name for a in arguments if not a.is_out] == names:
            forms.append(other)
    return [f for f in forms if f.overloadpacket not in UNDERIVABLE]


FUNCTIONAL = _covered_functional_ops()


def test_the_walk_sees_the_ops_it_should():
    names = {str(f) for f in FUNCTIONAL}
    assert {"aten.gelu.default", "aten.addmm.default", "aten.transpose.int", "aten.hardswish.default"} <= names
    forms = {str(m) for f in FUNCTIONAL for m in _mutating_forms(f)}
    assert {"aten.gelu_.default", "aten.gelu.out", "aten.addmm_.default", "aten.transpose_.default",
            "aten.masked_fill_.Tensor", "aten.unsqueeze_.default", "aten.hardswish_.default"} <= forms
    assert len(FUNCTIONAL) > 300 and len(forms) > 300


def test_every_pointwise_op_and_rule_key_and_their_in_place_and_out_forms_reach_a_rule():
    missing = sorted({str(f) for f in FUNCTIONAL if find_rule(f) is None}
                     | {str(m) for f in FUNCTIONAL for m in _mutating_forms(f) if find_rule(m) is None})
    assert not missing, missing


def test_functional_ops_keep_their_own_rules():
    for f in FUNCTIONAL:
        expected = RULES.get(f.overloadpacket, pointwise)
        assert find_rule(f) is expected, f


@pytest.mark.parametrize("op", [aten.hardswish.default, aten.masked_fill.Tensor, aten.unsafe_split.Tensor,
                                aten.split_with_sizes_copy.default, aten.transpose_copy.int,
                                aten.unsafe_split_with_sizes.default, aten.copy.default])
def test_untagged_ops_that_share_an_existing_rule_reach_it(op):
    assert find_rule(op) is not None


def test_an_in_place_squeeze_keeps_its_channels():
    assert find_rule(aten.squeeze_.dim) is None


def test_in_place_as_strided_has_its_own_rule_not_a_derived_one():
    # Derived forms rebuild self contiguous; as_strided_ must see self's real strides before.
    assert find_rule(aten.as_strided_.default) is RULES[aten.as_strided]


# -- small nets, checked by the oracle ---------------------------------------------------------

def _exact(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Prune half the channels of ``model``; asserts the oracle holds; returns the pruned copy."""
    error, plan = oracle_error(randomize(model).eval(), x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert plan.channels_removed > 0 and plan.params_after < plan.params_before, str(plan)
    assert error <= EXACT, (error, str(plan))
    return plan.model


class InPlace(nn.Module):
    """In-place activations, masking, shape changes and a Linear written as ``addmm_``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 12)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        y = aten.gelu_(self.a(x))
        y = nn.functional.mish(y, inplace=True)
        y = nn.functional.hardswish(y, inplace=True)
        y = nn.functional.threshold(y, 0.1, 0.0, inplace=True).abs_()
        y = self.b(y)
        y.masked_fill_(y > 1.0, 1.0)
        z = y.mean((2, 3))
        z.unsqueeze_(-2)     # (n, 1, 16)
        z.transpose_(1, 2)   # (n, 16, 1)
        h = self.fc.bias.expand(len(x), -1).clone()
        h.addmm_(z.squeeze(2), self.fc.weight.t())
        return self.head(h)


def test_in_place_ops_prune_exactly():
    model = _exact(InPlace(), torch.randn(2, 3, 8, 8))
    assert model.a.out_channels < 16 and model.b.out_channels < 16 and model.fc.out_features < 12


class OutArguments(nn.Module):
    """Results written into preallocated tensors (``out=``)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(3, 16, 3, padding=1)
        self.c = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        total = torch.empty_like(a)
        torch.add(a, b, out=total)
        torch.sigmoid(total, out=total)
        active = torch.empty_like(total)
        torch.threshold(total, 0.6, 0.0, out=active)
        joined = a.new_empty(0)   # resized by cat
        torch.cat([active, b], 1, out=joined)
        return self.c(joined)


def test_out_arguments_take_the_labels_of_the_result():
    model = _exact(OutArguments(), torch.randn(2, 3, 8, 8))
    assert model.a.out_channels == model.b.out_channels < 16 and model.c.in_channels < 32


class CopyForms(nn.Module):
    """``*_copy`` forms of view ops and ``unsafe_chunk`` (what recurrent cells split gates with)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        y = torch.permute_copy(self.conv(x), (0, 2, 3, 1))   # (n, h, w, 16)
        gate, value = y.unsafe_chunk(2, dim=-1)
        return self.fc(torch.sigmoid(gate) * value)


def test_copy_forms_and_unsafe_chunk_prune_exactly():
    model = _exact(CopyForms(), torch.randn(2, 3, 8, 8))
    assert model.conv.out_channels < 16 and model.fc.in_features < 8


class SqueezedInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        y = self.conv(x).mean((2, 3), keepdim=True)
        y.squeeze_()   # which size-1 dims went cannot be told afterwards
        return self.head(torch.relu(self.mid(y)))


def test_an_in_place_squeeze_keeps_what_flows_into_it_and_prunes_the_rest():
    x = torch.randn(2, 3, 8, 8)
    plan = pangkas.plan_channels(SqueezedInPlace(), x, ratio=0.5)
    assert any("no coupling rule" in why and "squeeze_" in why for why in plan.blocked())
    model = _exact(SqueezedInPlace(), x)
    assert model.conv.out_channels == 16 and model.mid.out_features < 16


# -- pixel shuffle ---------------------------------------------------------------------------

class ShuffleUp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.up = nn.Conv2d(16, 32, 3, padding=1)   # 8 channels x 2 x 2 sub-pixels
        self.shuffle = nn.PixelShuffle(2)
        self.out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.out(self.shuffle(self.up(torch.relu(self.a(x)))))


class ShuffleDown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.unshuffle = nn.PixelUnshuffle(2)
        self.b = nn.Conv2d(32, 16, 1)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.out(torch.relu(self.b(self.unshuffle(torch.relu(self.a(x))))))


class SuperResolution(nn.Module):
    """EDSR-like: head, residual body, sub-pixel upsampling by 2 twice, tail to RGB."""

    def __init__(self, width=16):
        super().__init__()
        self.head = nn.Conv2d(3, width, 3, padding=1)
        self.body = nn.ModuleList(nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                                nn.Conv2d(width, width, 3, padding=1)) for _ in range(2))
        self.up = nn.Sequential(nn.Conv2d(width, 4 * width, 3, padding=1), nn.PixelShuffle(2),
                                nn.Conv2d(width, 4 * width, 3, padding=1), nn.PixelShuffle(2))
        self.tail = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, x):
        y = self.head(x)
        for block in self.body:
            y = y + block(y)
        return self.tail(self.up(y))


def test_pixel_shuffle_removes_whole_sub_pixel_blocks():
    model = _exact(ShuffleUp(), torch.randn(2, 3, 6, 6))
    kept = model.out.in_channels
    assert kept < 8 and model.up.out_channels == 4 * kept


def test_pixel_unshuffle_spreads_each_channel_over_its_blocks():
    model = _exact(ShuffleDown(), torch.randn(2, 3, 8, 8))
    kept = model.a.out_channels
    assert kept < 8 and model.b.in_channels == 4 * kept


def test_super_resolution_net_prunes_its_upsampler_exactly():
    model = _exact(SuperResolution(), torch.randn(1, 3, 6, 6))
    assert model.up[0].out_channels < 64 and model.up[0].out_channels == 4 * model.up[2].in_channels
    assert model.tail.in_channels < 16 and model.tail.out_channels == 3


# -- hard-swish (MobileNetV3-like) ------------------------------------------------------------

class HardSwishBlock(nn.Module):
    """MobileNetV3's inverted residual: 1x1 expand, depthwise, squeeze-excite gated by
    hard-sigmoid, 1x1 project, all with hard-swish (one in place)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.expand = nn.Sequential(nn.Conv2d(16, 48, 1, bias=False), nn.BatchNorm2d(48), nn.Hardswish(inplace=True))
        self.depthwise = nn.Sequential(nn.Conv2d(48, 48, 3, padding=1, groups=48, bias=False), nn.BatchNorm2d(48),
                                       nn.Hardswish())
        self.squeeze = nn.Conv2d(48, 12, 1)
        self.excite = nn.Conv2d(12, 48, 1)
        self.project = nn.Sequential(nn.Conv2d(48, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.Conv2d(16, 32, 1), nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(32, 10))

    def forward(self, x):
        x = self.stem(x)
        y = self.depthwise(self.expand(x))
        scale = nn.functional.hardsigmoid(self.excite(torch.relu(self.squeeze(y.mean((2, 3), keepdim=True)))))
        return self.head(x + self.project(y * scale))


def test_hard_swish_block_prunes_exactly():
    model = _exact(HardSwishBlock(), torch.randn(2, 3, 8, 8))
    assert model.stem[0].out_channels < 16 and model.expand[0].out_channels < 48
    assert model.depthwise[0].groups == model.expand[0].out_channels == model.excite.out_channels
    assert model.head[0].out_channels < 32


# -- channel shuffle and GLU -------------------------------------------------------------------

class ShuffledGroups(nn.Module):
    """ShuffleNet-like: grouped 1x1, nn.ChannelShuffle, 1x1, and a GLU gate."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.g1 = nn.Conv2d(16, 16, 1, groups=4)
        self.shuffle = nn.ChannelShuffle(4)
        self.g2 = nn.Conv2d(16, 32, 1)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.g2(self.shuffle(torch.relu(self.g1(torch.relu(self.a(x))))))
        return self.out(nn.functional.glu(y, 1))


def test_channel_shuffle_and_glu_prune_exactly():
    model = _exact(ShuffledGroups(), torch.randn(2, 3, 6, 6))
    assert model.g1.out_channels < 16 and model.g1.groups == 4
    assert model.out.in_channels < 16 and model.g2.out_channels == 2 * model.out.in_channels
