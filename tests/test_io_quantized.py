"""pangkas.save / load of models quantized by pangkas.quantize: stored as int8 data + scales (sparse
ones as bitmap + int8 values), rebuilt bit for bit, refused clearly when they cannot be, and a
failed load leaves the model as it was."""

import json

import pytest
import safetensors.torch
import torch
from torch import nn

import pangkas
from pangkas import PangkasError
from pangkas.io import _crc, read_metadata

pytest.importorskip("torchao")
from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig, PerTensor, quantize_  # noqa: E402
from torchao.utils import TorchAOBaseTensor  # noqa: E402

SCHEMES = ["int8-dynamic", "int8-weight-only"]


def mlp():
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 10)).eval()


def quantized_file(tmp_path, scheme="int8-dynamic", model=None, name="q.safetensors"):
    quantized, _ = pangkas.quantize(mlp() if model is None else model, None, scheme)
    return quantized, pangkas.save(quantized, tmp_path / name)


def header(path):
    return json.loads(read_metadata(path)["pangkas"])


def rewrite(path, edit):
    """Rewrite ``path`` with ``edit(tensors, header)`` applied and the checksums made to agree, as
    a file that is consistent but says something wrong would be."""
    tensors, head = safetensors.torch.load_file(path), header(path)
    edit(tensors, head)
    head["crc32"] = {name: _crc(t) for name, t in tensors.items()}
    safetensors.torch.save_file(tensors, path, metadata={"pangkas": json.dumps(head)})


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, state):
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(p, TorchAOBaseTensor) for p in model.parameters())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip_is_bit_exact_and_the_file_a_quarter_of_float(tmp_path, scheme):
    quantized, path = quantized_file(tmp_path, scheme)
    entry = header(path)["entries"]["0.weight"]
    assert entry["quantized"] == scheme and entry["block_size"] == [1, 256] and entry["parts"]["qdata"] == {}
    fresh = pangkas.load(path, mlp())
    for key in ("0.weight", "2.weight", "4.weight"):
        loaded, saved = fresh.state_dict()[key], quantized.state_dict()[key]
        assert isinstance(loaded, Int8Tensor)
        assert loaded.__tensor_flatten__()[1] == saved.__tensor_flatten__()[1]  # scheme's attributes
        assert torch.equal(loaded.qdata, saved.qdata) and torch.equal(loaded.scale, saved.scale)
    x = torch.randn(16, 256)
    assert torch.equal(fresh(x), quantized(x))
    float_file = pangkas.save(mlp(), tmp_path / "float.safetensors")
    assert path.stat().st_size <= 0.3 * float_file.stat().st_size
    again = pangkas.save(fresh, tmp_path / "again.safetensors")
    assert again.read_bytes() == path.read_bytes()


def test_sparse_int8_stores_bitmap_and_int8_values_and_round_trips(tmp_path):
    sparse = mlp()
    pangkas.prune_weights(sparse, sparsity=0.5)
    quantized, path = quantized_file(tmp_path, model=sparse)
    _, dense_path = quantized_file(tmp_path, name="dense.safetensors")
    qdata = header(path)["entries"]["2.weight"]["parts"]["qdata"]
    assert qdata == {"bitmap": True, "mask": False, "shape": [256, 512]}
    assert safetensors.torch.load_file(path)["2.weight:qdata:values"].dtype == torch.int8
    # int8 bitmap + half the values: 1/8 + 1/2 of the dense int8 bytes
    assert path.stat().st_size <= 0.7 * dense_path.stat().st_size
    fresh = pangkas.load(path, mlp())
    x = torch.randn(16, 256)
    assert torch.equal(fresh(x), quantized(x))
    assert (fresh[2].weight.qdata == 0).float().mean() >= 0.5


def test_channel_pruned_then_quantized_round_trips(tmp_path):
    model, x = mlp(), torch.randn(16, 256)
    pangkas.prune_channels(model, x, ratio=0.5)
    quantized, path = quantized_file(tmp_path, "int8-weight-only", model=model)
    fresh = pangkas.load(path, mlp())
    assert fresh[0].weight.shape == quantized[0].weight.shape == (256, 256)
    assert isinstance(fresh[0].weight, Int8Tensor)
    assert torch.equal(fresh(x), quantized(x))


def test_weight_of_a_scheme_pangkas_does_not_know_is_refused(tmp_path):
    model = mlp()
    quantize_(model, Int8WeightOnlyConfig(granularity=PerTensor()))  # an Int8Tensor, but one scale per layer
    with pytest.raises(PangkasError, match=r"0\.weight.*not made by a scheme pangkas can save.*ONNX"):
        pangkas.save(model, tmp_path / "t.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_qdata_byte_fails_its_checksum(tmp_path):
    _, path = quantized_file(tmp_path)
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8:8 + size])["2.weight:qdata"]["data_offsets"]
    data[8 + size + start + 5] ^= 0x01
    path.write_bytes(bytes(data))
    fresh = mlp()
    state = snapshot(fresh)
    with pytest.raises(PangkasError, match=r"'2\.weight:qdata' fails its checksum"):
        pangkas.load(path, fresh)
    assert_untouched(fresh, state)


def _unknown_scheme(tensors, head):
    head["entries"]["0.weight"]["quantized"] = "int3-magic"


def _wrong_block_size(tensors, head):
    head["entries"]["0.weight"]["block_size"] = [1, 128]


def _missing_part(tensors, head):
    del head["entries"]["0.weight"]["parts"]["scale"]
    del tensors["0.weight:scale"]


def _stray_part(tensors, head):
    head["entries"]["0.weight"]["parts"]["act_pre_scale"] = {}
    tensors["0.weight:act_pre_scale"] = torch.ones(256)


def _wrong_scale_shape(tensors, head):
    tensors["0.weight:scale"] = tensors["0.weight:scale"].flatten()


def _nested_quantized_part(tensors, head):
    entry = head["entries"]["0.weight"]
    entry["parts"]["qdata"] = json.loads(json.dumps(entry))


def _masked_part(tensors, head):
    qdata = tensors.pop("0.weight:qdata")
    head["entries"]["0.weight"]["parts"]["qdata"] = {"bitmap": True, "mask": True, "shape": list(qdata.shape)}
    tensors["0.weight:qdata:bitmap"] = pangkas.io.pack_bits(torch.ones_like(qdata, dtype=torch.bool))
    tensors["0.weight:qdata:values"] = qdata.flatten()


def _alias_of_quantized(tensors, head):
    head["entries"]["4.weight"] = {"alias": "0.weight"}
    for name in [n for n in tensors if n.startswith("4.weight:")]:
        del tensors[name]


@pytest.mark.parametrize("edit, message", [
    (_unknown_scheme, "quantized with 'int3-magic', which pangkas cannot load"),
    (_wrong_block_size, r"block_size \[1, 128\] but int8-dynamic .* uses \[1, 256\]"),
    (_missing_part, "parts must be qdata, scale"),
    (_stray_part, "parts must be qdata, scale"),
    (_wrong_scale_shape, r"0\.weight:scale is torch.float32 \(512,\) in the file but .* \(512, 1\)"),
    (_nested_quantized_part, "or an unmasked"),
    (_masked_part, "or an unmasked"),
    (_alias_of_quantized, r"4\.weight is an alias of '0\.weight', which is not a stored entry \(of an unquantized"),
])
def test_bad_quantized_header_is_refused_and_model_unchanged(tmp_path, edit, message):
    _, path = quantized_file(tmp_path)
    rewrite(path, edit)
    fresh = mlp()
    state = snapshot(fresh)
    with pytest.raises(PangkasError, match=message):
        pangkas.load(path, fresh)
    assert_untouched(fresh, state)


def test_interrupt_after_weights_are_swapped_in_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    _, path = quantized_file(tmp_path)
    fresh = mlp()
    state, weights = snapshot(fresh), [fresh[i].weight for i in (0, 2, 4)]

    def interrupted(*args, **kwargs):
        assert isinstance(fresh[4].weight, Int8Tensor)  # the quantized weights are in by now
        raise KeyboardInterrupt

    monkeypatch.setattr(fresh, "load_state_dict", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pangkas.load(path, fresh)
    assert_untouched(fresh, state)
    assert all(fresh[i].weight is w for i, w in zip((0, 2, 4), weights))


def test_interrupt_while_weights_are_built_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    _, path = quantized_file(tmp_path)
    fresh = mlp()
    state = snapshot(fresh)
    real, calls = pangkas.io.quantized_weight, []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pangkas.io, "quantized_weight", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pangkas.load(path, fresh)
    assert len(calls) == 2
    assert_untouched(fresh, state)


def test_quantized_file_into_a_quantized_model_or_with_a_cast_is_refused(tmp_path):
    quantized, path = quantized_file(tmp_path)
    with pytest.raises(PangkasError, match="already quantized; load into a fresh float instance"):
        pangkas.load(path, quantized)
    fresh = mlp()
    state = snapshot(fresh)
    with pytest.raises(PangkasError, match="dtype= cannot cast a file with quantized weights"):
        pangkas.load(path, fresh, dtype=torch.float32)
    assert_untouched(fresh, state)


def test_quantized_layer_that_is_not_linear_in_the_model_is_refused(tmp_path):
    _, path = quantized_file(tmp_path)
    other = mlp()
    other[0] = nn.Module()  # same keys and shapes, but not a Linear layer
    other[0].weight, other[0].bias = nn.Parameter(torch.randn(512, 256)), nn.Parameter(torch.randn(512))
    state = snapshot(other)
    with pytest.raises(PangkasError, match=r"0\.weight is quantized with int8-dynamic.*weight of a Module"):
        pangkas.load(path, other)
    assert_untouched(other, state)


def test_quantized_weight_that_is_not_a_linear_weight_is_refused(tmp_path):
    model = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 4))
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, name: isinstance(module, nn.Embedding))
    with pytest.raises(PangkasError, match=r"0\.weight is a torchao tensor but not a Linear weight"):
        pangkas.save(model, tmp_path / "e.safetensors")
    assert list(tmp_path.iterdir()) == []
