"""pangkas.quantize: each scheme quantizes what it says, keeps the outputs, reports what stayed in
floating point, refuses what cannot work here, and leaves the input model as it was."""

import sys

import pytest
import torch
from torch import nn

import pangkas
from pangkas import PangkasError
from pangkas.measure import count_macs

pytest.importorskip("torchao")
from torchao.utils import TorchAOBaseTensor  # noqa: E402


class Block(nn.Module):
    """A residual block that calls one ReLU module twice, as torchvision's ResNets do."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class SmallResNet(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(Block(c), Block(c))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.blocks(torch.relu(self.stem(x))).mean((-1, -2)))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10)).eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(p, TorchAOBaseTensor) for p in model.parameters())


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int8-weight-only"])
def test_linear_schemes_quantize_every_linear_layer_and_keep_the_outputs(scheme):
    model, data = _mlp(), [torch.randn(16, 64) for _ in range(3)]
    before = _state(model)
    quantized, report = pangkas.quantize(model, data, scheme)
    assert report.quantized == ["0", "2", "4"] and not report.kept
    for name in report.quantized:
        assert isinstance(quantized.get_submodule(name).weight, TorchAOBaseTensor)
    x = torch.randn(32, 64)
    with torch.no_grad():
        cos = nn.functional.cosine_similarity(quantized(x), model(x)).min()
    assert cos > 0.99 and report.fidelity > 0.99
    assert quantized(x).sub(model(x)).abs().max() > 0  # it really computes with int8 weights
    _same(model, before)


def test_int8_dynamic_reports_the_convolutions_it_leaves_in_floating_point():
    model = SmallResNet().eval()
    quantized, report = pangkas.quantize(model, [torch.randn(4, 3, 8, 8)], "int8-dynamic")
    assert report.quantized == ["head"]
    assert set(report.kept) == {"stem", "blocks.0.conv1", "blocks.0.conv2", "blocks.1.conv1", "blocks.1.conv2"}
    assert all("int8-static" in why for why in report.kept.values())
    assert "left in floating point: stem" in str(report)


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int8-weight-only"])
def test_a_linear_layer_pruned_to_one_input_stays_in_floating_point(scheme):
    """torchao fails on a single input feature (an FFN cut to one neuron): that layer is kept."""
    model = nn.Sequential(nn.Linear(16, 1), nn.ReLU(), nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    quantized, report = pangkas.quantize(model, [torch.randn(8, 16)], scheme)
    assert report.quantized == ["0", "4"] and list(report.kept) == ["2"] and "one input" in report.kept["2"]
    assert type(quantized[2].weight) is nn.Parameter and isinstance(quantized[4].weight, TorchAOBaseTensor)
    assert report.fidelity > 0.99


def test_a_model_without_linear_layers_is_refused_for_a_linear_scheme():
    convs = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with pytest.raises(PangkasError, match="int8-static"):
        pangkas.quantize(convs, None, "int8-weight-only")


def test_int8_static_quantizes_convs_and_linears_of_a_resnet_with_a_shared_relu():
    torch.manual_seed(0)
    model = SmallResNet().eval()
    data = [torch.randn(8, 3, 12, 12) for _ in range(4)]
    before = _state(model)
    quantized, report = pangkas.quantize(model, data, "int8-static", example_inputs=torch.randn(2, 3, 12, 12))
    assert isinstance(quantized, torch.fx.GraphModule)
    assert len(report.quantized) == 6 and not report.kept  # 5 convs and the head
    assert report.fidelity > 0.99
    x = torch.randn(5, 3, 12, 12)  # another batch size than exported and calibrated with
    with torch.no_grad():
        y, y0 = quantized(x), model(x)
    assert nn.functional.cosine_similarity(y, y0).min() > 0.98 and not torch.equal(y, y0)
    quantized.eval()  # works on the exported graph too
    _same(model, before)


def test_int8_static_leaves_excluded_layers_in_floating_point():
    model = SmallResNet().eval()
    data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    _, report = pangkas.quantize(model, data, "int8-static", exclude=["head"])
    assert "head" not in report.layers and len(report.quantized) == 5
    _, report = pangkas.quantize(model, data, "int8-static", include=["blocks.0.conv1", "head"])
    assert sorted(report.quantized) == ["blocks.0.conv1", "head"]


def test_weight_masks_are_baked_in_and_stay_zero_in_int8():
    model = _mlp()
    pangkas.prune_weights(model, sparsity=0.5)
    quantized, report = pangkas.quantize(model, [torch.randn(8, 64)], "int8-weight-only")
    for name in report.quantized:
        qdata = quantized.get_submodule(name).weight.qdata
        assert (qdata == 0).float().mean() >= 0.5
    assert any(True for _ in pangkas.weights.masks.masked_modules(model))  # the input keeps its masks


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_int4_without_a_kernel_here_is_refused_before_touching_the_model():
    model = _mlp()
    before = _state(model)
    with pytest.raises(PangkasError, match="int4-weight-only is unsupported on this machine"):
        pangkas.quantize(model, None, "int4-weight-only")
    _same(model, before)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot capture it
            return self.fc(x)
        return x


@pytest.mark.parametrize("model, data, scheme, kwargs, match", [
    (nn.Linear(4, 4), [torch.randn(2, 4)], "int3", {}, "unknown scheme"),
    (nn.Linear(4, 4), None, "int8-static", {}, "calibrates activation scales on data"),
    (nn.Linear(4, 4), torch.randn(2, 4), "int8-dynamic", {}, "not a single batch"),
    (Branchy(), [torch.randn(2, 4)], "int8-static", {}, "torch.export"),
    (Branchy(), [torch.randn(2, 4)], "int8-static", {"exclude": ["fc"]}, "none is selected"),
])
def test_bad_input_is_refused(model, data, scheme, kwargs, match):
    with pytest.raises(PangkasError, match=match):
        pangkas.quantize(model, data, scheme, **kwargs)


def test_without_torchao_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(PangkasError, match=r"pangkas\[quantize\]"):
        pangkas.quantize(_mlp(), None, "int8-dynamic")


def test_an_example_of_batch_size_one_is_refused_when_calibration_batches_are_larger():
    model = SmallResNet().eval()
    with pytest.raises(PangkasError, match="batch of at least 2"):
        pangkas.quantize(model, [torch.randn(4, 3, 8, 8)], "int8-static", example_inputs=torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int8-weight-only", "int8-static"])
def test_measure_counts_the_macs_of_int8_layers_as_the_float_ones(scheme):
    """int8 changes how each multiply-accumulate is done, not how many (torch has no formula for
    the int8 matmul torchao's dynamic scheme runs: pangkas registers one)."""
    model = SmallResNet().eval() if scheme == "int8-static" else _mlp()
    x = torch.randn(4, 3, 8, 8) if scheme == "int8-static" else torch.randn(4, 64)
    quantized, _ = pangkas.quantize(model, [x], scheme)
    float_macs = count_macs(model, x)
    assert float_macs > 0 and count_macs(quantized, x) == float_macs
