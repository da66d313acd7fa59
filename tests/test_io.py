import copy
import json
import os

import pytest
import safetensors.torch
import torch
from torch import nn

import pangkas
from pangkas.io import pack_bits, unpack_bits
from pangkas.weights.masks import get_mask

from conftest import ConvNet, mlp


def big_mlp():
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        # bit-exact, including -0.0 and NaN payloads
        assert torch.equal(sa[key].reshape(-1).view(torch.uint8), sb[key].reshape(-1).view(torch.uint8)), key


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 64, 1001])
def test_bitmap_round_trip(numel):
    mask = torch.rand(numel) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-numel // 8)
    assert torch.equal(unpack_bits(packed, (numel,)), mask)


def test_round_trip_is_bit_exact_and_restores_masks(tmp_path, images):
    model = ConvNet()
    model.train()
    model(images)  # non-trivial BatchNorm running stats
    pangkas.prune_weights(model, sparsity=0.8)
    with torch.no_grad():
        model.conv.parametrizations.weight.original[0, 0, 0, 0] = -0.0
    path = pangkas.save(model, tmp_path / "m.safetensors")
    fresh = pangkas.load(path, ConvNet())
    assert_same_state(model, fresh)
    for name, module in model.named_modules():
        mask = get_mask(module)
        if mask is not None:
            assert torch.equal(get_mask(fresh.get_submodule(name)), mask), name
    # masks came back, so fine-tuning resumes with the same zeros
    pruned = fresh.conv.weight == 0
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        fresh(images).sum().backward()
        opt.step()
    assert (fresh.conv.weight[pruned] == 0).all()


def test_round_trip_dtypes_and_signed_zero(tmp_path):
    model = big_mlp().to(torch.bfloat16)
    pangkas.prune_weights(model, sparsity=0.9)
    pangkas.finalize(model)  # zeros without masks: still stored compressed
    with torch.no_grad():
        model[0].weight[0, 0] = -0.0
        model[2].weight[0, 0] = float("nan")
    path = pangkas.save(model, tmp_path / "bf16.safetensors")
    fresh = pangkas.load(path, big_mlp().to(torch.bfloat16))
    assert_same_state(model, fresh)
    assert get_mask(fresh[0]) is None  # no masks were saved, none invented
    assert torch.signbit(fresh[0].weight[0, 0])


def test_ninety_percent_sparse_file_is_at_most_15_percent_of_dense(tmp_path):
    model = big_mlp()
    dense_path = tmp_path / "dense.safetensors"
    safetensors.torch.save_model(model, str(dense_path))
    pangkas.prune_weights(model, sparsity=0.9, include=nn.Linear)
    pangkas.prune_weights(model, sparsity=0.9, scope="global")
    sparse_path = pangkas.save(model, tmp_path / "sparse.safetensors")
    weight_share = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear)) / sum(
        p.numel() for p in model.parameters())
    assert weight_share > 0.99
    ratio = sparse_path.stat().st_size / dense_path.stat().st_size
    assert ratio <= 0.15, ratio


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(100, 16)
            self.out = nn.Linear(16, 100, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, ids):
            return self.out(self.embed(ids))

    model = Tied()
    path = pangkas.save(model, tmp_path / "tied.safetensors")
    header = json.loads(pangkas.io.read_metadata(path)["pangkas"])
    assert header["entries"]["out.weight"] == {"alias": "embed.weight"}
    fresh = pangkas.load(path, Tied())
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert fresh.out.weight is fresh.embed.weight


def test_loads_plain_safetensors_state_dict(tmp_path):
    model = mlp()
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    fresh = pangkas.load(path, mlp())
    assert_same_state(model, fresh)


def test_metadata_is_kept(tmp_path):
    path = pangkas.save(mlp(), tmp_path / "m.safetensors", metadata={"source": "pkg:fn"})
    assert pangkas.io.read_metadata(path)["source"] == "pkg:fn"
    with pytest.raises(pangkas.PangkasError, match="reserved"):
        pangkas.save(mlp(), tmp_path / "n.safetensors", metadata={"pangkas": "x"})


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    pangkas.save(mlp(), path)
    original = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(pangkas.OperationFailed, match="cannot write .*disk full"):
        pangkas.save(big_mlp(), path, overwrite=True)
    assert path.read_bytes() == original  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_refuses_to_overwrite_the_input_unless_told(tmp_path):
    path = pangkas.save(mlp(), tmp_path / "m.safetensors")
    model = pangkas.load(path, mlp())
    pangkas.prune_weights(model, sparsity=0.5)
    before = path.read_bytes()
    with pytest.raises(pangkas.PangkasError, match="loaded from"):
        pangkas.save(model, path)
    assert path.read_bytes() == before
    pangkas.save(model, tmp_path / "other.safetensors")  # elsewhere is fine
    pangkas.save(model, path, overwrite_input=True)
    assert path.read_bytes() != before


def test_truncated_file_is_a_clear_error(tmp_path):
    path = pangkas.save(big_mlp(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        broken = tmp_path / f"cut{cut}.safetensors"
        broken.write_bytes(data[:cut])
        model = big_mlp()
        state = copy.deepcopy(model.state_dict())
        with pytest.raises(pangkas.PangkasError, match="truncated or corrupt"):
            pangkas.load(broken, model)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_corrupt_tensor_bytes_fail_the_checksum(tmp_path):
    model = big_mlp()
    pangkas.prune_weights(model, sparsity=0.5)
    path = pangkas.save(model, tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    fresh = big_mlp()
    state = copy.deepcopy(fresh.state_dict())
    with pytest.raises(pangkas.PangkasError, match="checksum"):
        pangkas.load(path, fresh)
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())


def test_wrong_architecture_is_refused_and_model_unchanged(tmp_path):
    path = pangkas.save(mlp(), tmp_path / "m.safetensors")
    other = big_mlp()
    pangkas.prune_weights(other, sparsity=0.5)
    state = copy.deepcopy(other.state_dict())
    with pytest.raises(pangkas.PangkasError, match="does not fit"):
        pangkas.load(path, other)
    assert get_mask(other[0]) is not None
    assert all(torch.equal(v, state[k]) for k, v in other.state_dict().items())


def test_missing_file():
    with pytest.raises(pangkas.PangkasError, match="no such file"):
        pangkas.load("/nonexistent/m.safetensors", mlp())


def test_load_removes_masks_the_file_does_not_have(tmp_path):
    dense = mlp()
    path = pangkas.save(dense, tmp_path / "dense.safetensors")
    model = mlp()
    pangkas.prune_weights(model, sparsity=0.5)
    pangkas.load(path, model)
    assert get_mask(model[0]) is None
    assert_same_state(dense, model)


def test_sparse_inference_model_cannot_be_saved(tmp_path):
    model = big_mlp()
    pangkas.prune_weights(model, sparsity=0.99)
    pangkas.to_sparse_inference(model, min_sparsity=0.9)
    with pytest.raises(pangkas.PangkasError, match="before to_sparse_inference"):
        pangkas.save(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


# -- dtypes ----------------------------------------------------------------------------------------

def normed():
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 4))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {
        n: None if get_mask(m) is None else get_mask(m).clone() for n, m in model.named_modules()}


def assert_snapshot(model, before):
    state, masks = snapshot(model)
    assert state.keys() == before[0].keys()
    for key, value in state.items():
        assert value.dtype == before[0][key].dtype and torch.equal(value, before[0][key]), key
    assert {n: m is None for n, m in masks.items()} == {n: m is None for n, m in before[1].items()}


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_float_dtype_is_refused_unless_cast_is_asked_for(tmp_path, file_dtype):
    model = normed()
    model.train()
    model(torch.randn(8, 16))
    model.to(file_dtype)
    pangkas.prune_weights(model, sparsity=0.5)
    path = pangkas.save(model, tmp_path / "m.safetensors")
    fresh = normed()
    before = snapshot(fresh)
    with pytest.raises(pangkas.PangkasError, match=rf"0\.weight is {file_dtype} in the file but torch\.float32 "
                                                   r"in Sequential; pass dtype=torch\.float32"):
        pangkas.load(path, fresh)
    assert_snapshot(fresh, before)
    pangkas.load(path, fresh, dtype=torch.float32)
    for key, value in model.state_dict().items():
        loaded = fresh.state_dict()[key]
        want = value.float() if value.is_floating_point() else value  # ints (num_batches_tracked) as they are
        assert loaded.dtype == want.dtype and torch.equal(loaded, want), key
    assert torch.equal(get_mask(fresh[0]), get_mask(model[0]))


def test_cast_must_land_on_the_model_dtype(tmp_path):
    path = pangkas.save(normed().to(torch.bfloat16), tmp_path / "m.safetensors")
    fresh = normed()
    before = snapshot(fresh)
    with pytest.raises(pangkas.PangkasError, match=r"0\.weight is torch\.float16 in the file but torch\.float32"):
        pangkas.load(path, fresh, dtype=torch.float16)
    assert_snapshot(fresh, before)
    for bad in (torch.int64, "float32", 32):
        with pytest.raises(pangkas.PangkasError, match="floating-point torch.dtype"):
            pangkas.load(path, fresh, dtype=bad)
    assert_snapshot(fresh, before)


def test_integer_buffer_dtype_mismatch_is_refused_without_a_cast_hint(tmp_path):
    model = normed()
    model[1].num_batches_tracked = model[1].num_batches_tracked.to(torch.int32)
    path = pangkas.save(model, tmp_path / "m.safetensors")
    fresh = normed()
    before = snapshot(fresh)
    with pytest.raises(pangkas.PangkasError, match=r"1\.num_batches_tracked is torch\.int32 in the file but "
                                                   r"torch\.int64 in Sequential; convert the model"):
        pangkas.load(path, fresh, dtype=torch.float32)
    assert_snapshot(fresh, before)

