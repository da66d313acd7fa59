"""pangkas.save / load of int8-static models (torchao's PT2E graphs): stored as the tensors the graph
reads (sparse int8 weights as bitmap + int8 values) and the numbers its quantize steps use, rebuilt
from a fresh float instance bit for bit; a file that does not rebuild the same graph, or is damaged,
is refused, and the model given to load is never changed."""

import json

import pytest
import safetensors.torch
import torch
from torch import nn

import pangkas
from pangkas import PangkasError
from pangkas.io import _crc, read_metadata

pytest.importorskip("torchao")


class Residual(nn.Module):
    """A conv + BN block whose ReLU module is called twice (as torchvision's ResNet blocks do)."""

    def __init__(self, width=8):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(self.relu(x))) + x)


def cnn(width=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), Residual(width),
                         Residual(width), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def trained(model):
    """BN statistics and weights that are not the fresh ones (a file must carry them)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.normal_()
    return model.eval()


DATA = [torch.randn(4, 1, 8, 8) for _ in range(3)]


def static_file(tmp_path, model=None, name="s.safetensors", **options):
    model = trained(cnn()) if model is None else model
    quantized, report = pangkas.quantize(model, DATA, "int8-static", **options)
    return quantized, pangkas.save(quantized, tmp_path / name)


def header(path):
    return json.loads(read_metadata(path)["pangkas"])


def rewrite(path, edit):
    tensors, head = safetensors.torch.load_file(path), header(path)
    edit(tensors, head)
    head["crc32"] = {name: _crc(t) for name, t in tensors.items()}
    safetensors.torch.save_file(tensors, path, metadata={"pangkas": json.dumps(head)})


def test_pruned_static_model_round_trips_bit_for_bit_from_a_fresh_instance(tmp_path):
    model = trained(cnn(64))
    pangkas.prune_channels(model, DATA[0], ratio=0.5)
    pangkas.prune_weights(model, sparsity=0.5)
    quantized, path = static_file(tmp_path, model)
    fresh = cnn(64)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    loaded = pangkas.load(path, fresh)
    x = torch.randn(5, 1, 8, 8)  # another batch size: dim 0 stays dynamic
    assert torch.equal(loaded(x), quantized(x))
    assert fresh.state_dict().keys() == before.keys()  # the architecture given is left as it was
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert not any(t.is_floating_point() and t.dim() == 4 for t in [*loaded.parameters(), *loaded.buffers()])
    # sparse int8 weights are stored as bitmap + values, and the file is well under the float one's
    entries = header(path)["entries"]
    assert any(entry.get("bitmap") for key, entry in entries.items() if key.startswith("_frozen_param"))
    float_file = pangkas.save(model, tmp_path / "float.safetensors")
    assert path.stat().st_size < 0.4 * float_file.stat().st_size  # int8 values: a quarter, plus the same bitmap


def test_saving_a_loaded_graph_writes_the_same_tensors(tmp_path):
    _, path = static_file(tmp_path)
    again = pangkas.save(pangkas.load(path, cnn()), tmp_path / "again.safetensors")
    first, second = safetensors.torch.load_file(path), safetensors.torch.load_file(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert header(path) == header(again)


def test_layers_left_in_float_stay_so_after_loading(tmp_path):
    quantized, path = static_file(tmp_path, exclude=["7"])
    loaded = pangkas.load(path, cnn())
    assert header(path)["static"]["float_layers"] == ["7"]
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(loaded(x), quantized(x))


def test_dict_input_model_round_trips(tmp_path):
    class Keyed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, features, scale):
            return self.b(torch.relu(self.a(features) * scale))

    torch.manual_seed(1)
    data = [{"features": torch.randn(4, 6), "scale": torch.rand(4, 1) + 0.5} for _ in range(2)]
    quantized, _ = pangkas.quantize(Keyed().eval(), data, "int8-static")
    path = pangkas.save(quantized, tmp_path / "k.safetensors")
    torch.manual_seed(2)
    loaded = pangkas.load(path, Keyed())
    batch = {"features": torch.randn(3, 6), "scale": torch.rand(3, 1)}
    assert torch.equal(loaded(**batch), quantized(**batch))


def test_layer_pruned_model_replays_its_edits(tmp_path):
    model = trained(cnn())
    pangkas.prune_layers(model, DATA, n=1)
    quantized, path = static_file(tmp_path, model)
    assert header(path)["edits"]
    loaded = pangkas.load(path, cnn())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded(x), quantized(x))


def test_another_architecture_is_refused_and_left_as_it_was(tmp_path):
    _, path = static_file(tmp_path)
    other = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), Residual(), Residual(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10), nn.Tanh())
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(PangkasError, match="does not rebuild the int8-static graph"):
        pangkas.load(path, other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(PangkasError, match="does not fit"):
        pangkas.load(path, nn.Sequential(nn.Linear(3, 3)))


@pytest.mark.parametrize("damage, message", [
    (lambda t, h: h["static"].update(digest="0" * 16), "does not rebuild"),
    (lambda t, h: h["static"].pop("example"), '"static" is not'),
    (lambda t, h: h["static"]["example"]["args"][0].__setitem__(1, "complex128"), '"static" is not'),
    (lambda t, h: h["static"]["shapes"].update({"0.weight": [-1]}), '"static" is not'),
    (lambda t, h: (h["entries"].pop(":floats"), t.pop(":floats")), "must store"),
    (lambda t, h: t.update({"_scale_0": t["_scale_0"][:-1]}), "reads _scale_0 as"),
    (lambda t, h: t.update({":floats": t[":floats"][:-1]}), "numbers"),
    (lambda t, h: h["entries"].update({"_zero_point_0": {"zeros": "object", "shape": [8]}}), "dtype"),
])
def test_a_file_that_says_something_wrong_is_refused(tmp_path, damage, message):
    _, path = static_file(tmp_path)
    rewrite(path, damage)
    fresh = cnn()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(PangkasError, match=message):
        pangkas.load(path, fresh)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_corrupt_bytes_are_caught_by_the_checksums(tmp_path):
    _, path = static_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(PangkasError, match="checksum"):
        pangkas.load(path, cnn())


def test_an_interrupted_load_changes_nothing(tmp_path, monkeypatch):
    from pangkas import quant_static

    _, path = static_file(tmp_path)
    fresh = cnn()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(quant_static, "build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pangkas.load(path, fresh)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_what_a_file_cannot_describe_is_refused_on_save(tmp_path):
    graph = torch.export.export(nn.Sequential(nn.Linear(4, 4)), (torch.randn(2, 4),)).module()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    prepared(torch.randn(2, 4))
    with pytest.raises(PangkasError, match="not made by pangkas.quantize"):
        pangkas.save(convert_pt2e(prepared), tmp_path / "x.safetensors")

    class Flagged(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, flip: bool):
            return -self.fc(x) if flip else self.fc(x)

    quantized, _ = pangkas.quantize(Flagged().eval(), [(torch.randn(2, 4), True)], "int8-static")
    with pytest.raises(PangkasError, match="not all tensors"):
        pangkas.save(quantized, tmp_path / "y.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_dtype_and_a_quantized_target(tmp_path):
    quantized, path = static_file(tmp_path)
    with pytest.raises(PangkasError, match="dtype="):
        pangkas.load(path, cnn(), dtype=torch.float16)
    with pytest.raises(PangkasError, match="already quantized"):
        pangkas.load(path, quantized)


def test_all_zero_tensors_are_stored_as_their_shape(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].bias.zero_()
        model[1].bias.copy_(torch.tensor([0.0, -0.0]))  # -0.0 is not +0: stored as a value
    path = pangkas.save(model, tmp_path / "z.safetensors")
    entries = header(path)["entries"]
    assert entries["0.bias"] == {"zeros": "float32", "shape": [6]} and "zeros" not in entries["1.bias"]
    fresh = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    pangkas.load(path, fresh)
    assert torch.equal(fresh[0].bias, torch.zeros(6)) and torch.signbit(fresh[1].bias[1])


def test_exported_onnx_of_a_loaded_graph_runs(tmp_path):
    pytest.importorskip("onnxruntime")
    quantized, path = static_file(tmp_path)
    loaded = pangkas.load(path, cnn())
    report = pangkas.export_onnx(loaded, tmp_path / "s.onnx", DATA[0])
    assert report.cosine > 0.99
