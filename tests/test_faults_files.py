"""Fault injection: damaged and crafted files, and interrupts in the middle of an operation.

A load of a damaged file ends one of two ways: ``PangkasError`` with the model bit-identical to
before, or a model bit-identical to the one saved; never garbage, never another exception. An
interrupt (any BaseException) propagates as it is, and leaves the model exactly as it was.
"""

import json

import pytest
import safetensors.torch
import torch
from torch import nn

import pangkas
from pangkas.io import _crc
from pangkas.weights.masks import masks_by_key

import nets


class Tiny(nn.Module):
    """A masked weight (bitmap + values), a zero bias (bitmap without mask), BatchNorm buffers
    (an int64 among them) and a tied weight (an alias): every kind of entry in a small file."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 4)
        self.back = nn.Linear(4, 4, bias=False)
        self.back.weight = self.out.weight

    def forward(self, x):
        return self.back(self.out(self.bn(self.lin(x))))


class Blocks(nn.Module):
    """Four residual blocks in a ModuleList, for layer pruning."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 8, generator=g) for _ in range(2)]


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def contents(model: nn.Module) -> tuple:
    """What a file can carry: the state dict (raw bytes, dtypes, shapes) and the masks."""
    state = {k: (v.dtype, tuple(v.shape), tensor_bytes(v)) for k, v in model.state_dict().items()}
    return state, {k: tensor_bytes(m) for k, m in masks_by_key(model).items()}


def fingerprint(model: nn.Module) -> tuple:
    """Everything "exactly as it was" means: contents, every Parameter/buffer object (ties
    included) under its name, each module's class and attributes (in/out features...)."""
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    tensors = {name: (id(t), t.dtype, tuple(t.shape), tensor_bytes(t)) for name, t in named}
    modules = [(name, type(m).__name__, m.extra_repr(), len(m) if isinstance(m, (nn.Sequential, nn.ModuleList)) else None)
               for name, m in model.named_modules()]
    return contents(model), tensors, modules, {k: v for k, v in vars(model).items() if k.startswith("_pangkas")}


def tiny_saved(directory) -> tuple[bytes, tuple]:
    torch.manual_seed(0)
    model = Tiny().train()
    model(torch.randn(8, 3))  # running statistics that are not 0 and 1
    pangkas.prune_weights(model, sparsity=0.5, include="lin")
    path = pangkas.save(model, directory / "tiny.safetensors")
    return path.read_bytes(), contents(model)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return tiny_saved(tmp_path_factory.mktemp("tiny"))


def outcome(data: bytes, path, expected) -> str:
    """Load ``data`` into a fresh Tiny: "refused" (model untouched) or "loaded" (bit-exact)."""
    path.write_bytes(data)
    torch.manual_seed(1)  # weights unlike the saved ones, so a partial load shows
    fresh = Tiny()
    before = fingerprint(fresh)
    try:
        pangkas.load(path, fresh)
    except pangkas.PangkasError as exc:
        assert str(path) in str(exc)
        assert fingerprint(fresh) == before
        return "refused"
    assert contents(fresh) == expected
    return "loaded"


def refused(data: bytes, path, message: str) -> None:
    """Loading ``data`` raises PangkasError matching ``message`` and leaves the model untouched."""
    path.write_bytes(data)
    fresh = Tiny()
    before = fingerprint(fresh)
    with pytest.raises(pangkas.PangkasError, match=message) as raised:
        pangkas.load(path, fresh)
    assert str(raised.value).startswith(str(path))
    assert fingerprint(fresh) == before


def header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


# -- every byte, every length --------------------------------------------------------------------

def test_the_file_is_small_and_loads(saved, tmp_path):
    data, expected = saved
    assert 500 < len(data) < 2500
    assert outcome(data, tmp_path / "f.safetensors", expected) == "loaded"


@pytest.mark.parametrize("mask", [0xFF, 0x01], ids=["inverted", "low bit"])
def test_every_flipped_byte_is_refused(saved, tmp_path, mask):
    """0xFF makes any header byte invalid UTF-8; flipping the low bit keeps it ASCII, so digits
    of sizes, offsets and checksums become other digits and the JSON often stays valid."""
    data, expected = saved
    path = tmp_path / "f.safetensors"
    results = []
    for position in range(len(data)):  # about 2 x 1700 loads of ~1 ms
        variant = bytearray(data)
        variant[position] ^= mask
        results.append(outcome(bytes(variant), path, expected))
    # "loaded" (bit-exact) would be acceptable, but no byte of this file is harmless to change:
    # each is JSON syntax, a name, a number, padding, or tensor data under a checksum.
    assert set(results) == {"refused"}


def test_every_truncation_is_refused(saved, tmp_path):
    data, expected = saved
    path = tmp_path / "f.safetensors"
    assert {outcome(data[:length], path, expected) for length in range(len(data))} == {"refused"}


# -- crafted headers -------------------------------------------------------------------------------

def crafted(saved, edit_header=None, edit_tensors=None) -> bytes:
    """The saved file with its pangkas header and/or tensors changed (checksums of changed tensors
    recomputed, so only the inconsistency itself can give it away)."""
    data, _ = saved
    tensors = safetensors.torch.load(data)
    metadata = json.loads(data[8:header_end(data)])["__metadata__"]
    header = json.loads(metadata["pangkas"])
    if edit_tensors is not None:
        edit_tensors(tensors)
        header["crc32"] = {name: _crc(t) for name, t in tensors.items()}
    text = json.dumps(header)
    if edit_header is not None:
        changed = edit_header(header)
        text = changed if isinstance(changed, str) else json.dumps(header)
    return safetensors.torch.save(tensors, metadata={"pangkas": text})


def entry(key, **values):
    return setting("entries", key, value=values)


def setting(*path, value=None, delete=False):
    def edit(header):
        owner = header
        for key in path[:-1]:
            owner = owner[key]
        if delete:
            del owner[path[-1]]
        else:
            owner[path[-1]] = value
    return edit


BITMAP = dict(bitmap=True, mask=True)
LIN = r"lin\.weight: shape"
CRAFTED = {  # case: (edit, what the message must say)
    "no crc32": (setting("crc32", delete=True), r'"crc32" is missing'),
    "no entries": (setting("entries", delete=True), r'"entries" is missing'),
    "entries a list": (setting("entries", value=[]), r'"entries" is missing or not an object'),
    "entry a list": (setting("entries", "lin.bias", value=[]), r"entry lin\.bias is \[\]"),
    "entry a string": (setting("entries", "lin.bias", value="dense"), r"entry lin\.bias is 'dense'"),
    "unknown entry key": (entry("lin.weight", **BITMAP, shape=[4, 3], extra=1), r"entry lin\.weight is"),
    "bitmap false": (entry("lin.weight", bitmap=False, mask=True, shape=[4, 3]), r'lin\.weight: "bitmap" must be true'),
    "mask not a bool": (entry("lin.weight", bitmap=True, mask="yes", shape=[4, 3]), r'"mask" true or false'),
    "shape too large for the bitmap": (entry("lin.weight", **BITMAP, shape=[8, 3]), LIN + r" \[8, 3\] needs a 3-byte"),
    "shape too small for the bitmap": (entry("lin.weight", **BITMAP, shape=[2, 3]), LIN + r" \[2, 3\] needs a 1-byte"),
    "negative shape": (entry("lin.weight", **BITMAP, shape=[-4, -3]), LIN + r" \[-4, -3\] is not a list of sizes"),
    "absurd shape": (entry("lin.weight", **BITMAP, shape=[10**12, 10**12]), LIN + r" \[1000000000000, "),
    "float shape": (entry("lin.weight", **BITMAP, shape=[4.0, 3]), LIN + r" \[4\.0, 3\] is not a list"),
    "bool shape": (entry("lin.weight", **BITMAP, shape=[True, 3]), LIN + r" \[True, 3\] is not a list"),
    "shape not a list": (entry("lin.weight", **BITMAP, shape=12), LIN + r" 12 is not a list"),
    "alias to a missing key": (setting("entries", "back.weight", value={"alias": "nowhere"}),
                               r"back\.weight is an alias of 'nowhere', which is not a stored entry"),
    "alias to an alias": (setting("entries", "out.weight", value={"alias": "back.weight"}),
                          r"out\.weight is an alias of 'back\.weight', which is not a stored entry"),
    "alias not a name": (setting("entries", "back.weight", value={"alias": ["out.weight"]}),
                         r"back\.weight is an alias of \['out\.weight'\]"),
    "edits not a list": (setting("edits", value={"remove_blocks": ["lin"]}), r'"edits" is not a list'),
    "edit names not a list": (setting("edits", value=[{"remove_blocks": "lin"}]), r'"edits" is not a list'),
    "edit tuple length negative": (setting("edits", value=[{"remove_blocks": ["lin"], "tuple_lengths": {"lin": -1}}]),
                                   r'"edits" is not a list'),
    "reshaped not a bool": (setting("reshaped", value="yes"), r'"reshaped" is not true or false'),
    "crc32 a string": (setting("crc32", "lin.bias", value="3042779721"), r'"crc32" .* 32-bit integers'),
    "crc32 a float": (setting("crc32", "lin.bias", value=1.5), r'"crc32" .* 32-bit integers'),
    "crc32 a bool": (setting("crc32", "lin.bias", value=True), r'"crc32" .* 32-bit integers'),
    "crc32 negative": (setting("crc32", "lin.bias", value=-1), r'"crc32" .* 32-bit integers'),
    "crc32 above 32 bits": (setting("crc32", "lin.bias", value=2**32), r'"crc32" .* 32-bit integers'),
    "crc32 missing a tensor": (setting("crc32", "lin.bias", delete=True), "do not account for exactly"),
    "tensor under no entry": (setting("entries", "lin.bias", delete=True), "do not account for exactly"),
    "misspelt optional key": (lambda h: json.dumps(h).replace('"edits"', '"edius"'), r"unknown keys \['edius'\]"),
    "header a list": (lambda h: "[]", "not a JSON object"),
    "header null": (lambda h: "null", "not a JSON object"),
    "header not JSON": (lambda h: "{format", "Expecting property name"),
    "header nested too deep": (lambda h: "[" * 100_000 + "]" * 100_000, "recursion"),
    "integer too long for Python": (lambda h: json.dumps(h).replace("[4, 3]", "[" + "9" * 5000 + ", 3]"), "digits"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_header_is_refused_before_the_model_is_touched(saved, tmp_path, case):
    edit, message = CRAFTED[case]
    refused(crafted(saved, edit), tmp_path / "f.safetensors", "corrupt pangkas header: .*" + message)


def test_edit_of_a_block_the_model_lacks_is_refused(saved, tmp_path):
    refused(crafted(saved, setting("edits", value=[{"remove_blocks": ["lin", "nowhere.3"]}])),
            tmp_path / "f.safetensors", "removes blocks this model does not have")


def test_unknown_format_is_refused(saved, tmp_path):
    refused(crafted(saved, setting("format", value="pangkas-2")), tmp_path / "f.safetensors",
            "unknown format 'pangkas-2'")


def drop_last_value(tensors):
    tensors["lin.weight:values"] = tensors["lin.weight:values"][:-1].clone()


def wide_bitmap(tensors):
    tensors["lin.weight:bitmap"] = tensors["lin.weight:bitmap"].to(torch.int16)


def bit_past_the_end(tensors):
    tensors["lin.weight:bitmap"][-1] |= 1  # bit 15 of a 12-bit mask


def values_2d(tensors):
    tensors["lin.weight:values"] = tensors["lin.weight:values"].reshape(2, -1).clone()


@pytest.mark.parametrize("edit,message", [
    (drop_last_value, r"lin\.weight: its bitmap marks 6 of 12 positions but 5 values"),
    (bit_past_the_end, r"lin\.weight: its bitmap marks 6 of 12 positions but 6 values"),
    (wide_bitmap, r"lin\.weight: shape \[4, 3\] needs a 2-byte bitmap"),
    (values_2d, r"lin\.weight: shape \[4, 3\] needs a 2-byte bitmap and 1-d values"),
], ids=["values short of the bitmap", "bit past the end", "bitmap not bytes", "values not 1-d"])
def test_bitmap_that_disagrees_with_its_values_is_refused(saved, tmp_path, edit, message):
    refused(crafted(saved, edit_tensors=edit), tmp_path / "f.safetensors", "corrupt pangkas header: " + message)


def test_a_shape_still_inside_the_bitmap_is_caught_by_the_model_shapes(saved, tmp_path):
    """[4, 4] needs the same 2-byte bitmap as [4, 3] and its extra bits are 0: only the model's
    shapes can tell, and they do."""
    refused(crafted(saved, entry("lin.weight", **BITMAP, shape=[4, 4])), tmp_path / "f.safetensors",
            r"does not fit Tiny: .*lin\.weight: file \(4, 4\)")


# -- interrupts ------------------------------------------------------------------------------------

class Interrupt:
    """A stand-in for ``fn`` that raises KeyboardInterrupt on call number ``at`` (1-based)."""

    def __init__(self, fn, at=1):
        self.fn, self.at, self.calls = fn, at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.fn(*args, **kwargs)


def interrupted(model, run) -> None:
    before = fingerprint(model)
    with pytest.raises(KeyboardInterrupt):
        run()
    assert fingerprint(model) == before


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("pruned_before", [False, True])
def test_interrupted_prune_weights_sets_no_mask(monkeypatch, pruned_before):
    model = mlp()
    if pruned_before:
        pangkas.prune_weights(model, sparsity=0.2)
    fake = Interrupt(pangkas.weights.prune.set_mask, at=2)
    monkeypatch.setattr(pangkas.weights.prune, "set_mask", fake)
    interrupted(model, lambda: pangkas.prune_weights(model, sparsity=0.5))
    assert fake.calls >= 2


def test_interrupt_inside_set_mask_unmasks_that_layer_too(monkeypatch):
    """The second layer is parametrized but not yet hooked when the interrupt comes."""
    model = mlp()
    fake = Interrupt(pangkas.weights.masks._add_hooks, at=2)
    monkeypatch.setattr(pangkas.weights.masks, "_add_hooks", fake)
    interrupted(model, lambda: pangkas.prune_weights(model, sparsity=0.5))
    assert fake.calls == 2


def test_interrupted_sparsegpt_puts_the_weights_back(monkeypatch):
    model = mlp()
    data = [torch.randn(16, 8) for _ in range(2)]
    monkeypatch.setattr(pangkas.weights.prune, "set_mask", Interrupt(pangkas.weights.prune.set_mask, at=2))
    interrupted(model, lambda: pangkas.prune_weights(model, sparsity=0.5, importance="sparsegpt", data=data))


def test_interrupted_channel_verification_restores_the_model(monkeypatch):
    model, x = nets.Residual(), torch.randn(nets.IMAGES)
    plan = pangkas.plan_channels(model, x, ratio=0.5)
    fake = Interrupt(pangkas.channels.run_traced)
    monkeypatch.setattr(pangkas.channels, "run_traced", fake)
    interrupted(model, plan.apply)
    assert fake.calls == 1 and not plan.applied
    monkeypatch.undo()
    plan.apply()  # the plan still holds: nothing was left half done
    assert model.head.in_features < 32


def test_interrupted_surgery_fixer_restores_the_model():
    def interrupt(model, undo):
        if next(model.parameters()).device.type != "meta":  # the plan rehearsed on a weightless copy
            raise KeyboardInterrupt

    model, x = nets.Residual(), torch.randn(nets.IMAGES)
    fixer = pangkas.integrations.Integration("interrupting", fixers=[interrupt])
    plan = pangkas.plan_channels(model, x, ratio=0.5, integrations=[fixer])
    interrupted(model, plan.apply)


def test_interrupted_layer_check_puts_the_blocks_back(monkeypatch):
    model = Blocks()
    plan = pangkas.plan_layers(model, batches(), n=2)
    fake = Interrupt(pangkas.layers._output_shapes, at=2)  # the first call measures the model before
    monkeypatch.setattr(pangkas.layers, "_output_shapes", fake)
    interrupted(model, plan.apply)
    assert fake.calls == 2 and len(model.blocks) == 4 and not plan.applied


def test_interrupted_block_removal_puts_the_blocks_back(monkeypatch):
    model = Blocks()
    monkeypatch.setattr(pangkas.surgery.blocks, "_renumber", Interrupt(None))
    interrupted(model, lambda: pangkas.surgery.blocks.remove_blocks(model, ["blocks.1", "blocks.3"]))


def test_interrupted_shrink_restores_the_tensors(monkeypatch):
    model = mlp()
    keep = {"0.weight": [torch.arange(8), None], "0.bias": [torch.arange(8)], "2.weight": [None, torch.arange(8)]}
    monkeypatch.setattr(pangkas.surgery, "update", Interrupt(pangkas.surgery.update, at=2))
    interrupted(model, lambda: pangkas.surgery.shrink(model, keep))


def test_interrupted_prune_transformer_restores_model_and_config(monkeypatch):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    x = {"input_ids": torch.randint(1, 100, (2, 8))}
    sizes = dict(vars(model.config))
    monkeypatch.setattr(pangkas.integrations.huggingface, "config_describes", Interrupt(None))
    interrupted(model, lambda: pangkas.prune_transformer(model, x, heads=0.5, ffn=0.5))
    assert dict(vars(model.config)) == sizes


def test_interrupted_load_midway_restores_values_and_masks(saved, tmp_path, monkeypatch):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(saved[0])
    fresh = Tiny()
    pangkas.prune_weights(fresh, sparsity=0.25)  # masks of its own, which the file replaces
    # bn (the second module loaded) is interrupted after lin's weight and bias were copied
    monkeypatch.setattr(fresh.bn, "_load_from_state_dict", Interrupt(None))
    interrupted(fresh, lambda: pangkas.load(path, fresh))


def test_interrupted_load_of_a_cut_model_restores_its_shapes(tmp_path, monkeypatch):
    model, x = nets.Residual(), torch.randn(nets.IMAGES)
    pangkas.prune_channels(model, x, ratio=0.5)
    path = pangkas.save(model, tmp_path / "cut.safetensors")
    fresh = nets.Residual()
    monkeypatch.setattr(fresh, "load_state_dict", Interrupt(None))
    interrupted(fresh, lambda: pangkas.load(path, fresh))


def test_interrupted_load_of_a_layer_pruned_model_puts_the_blocks_back(tmp_path, monkeypatch):
    model = Blocks()
    pangkas.prune_layers(model, batches(), n=2)
    path = pangkas.save(model, tmp_path / "short.safetensors")
    fresh = Blocks()
    monkeypatch.setattr(fresh, "load_state_dict", Interrupt(None))
    interrupted(fresh, lambda: pangkas.load(path, fresh))
    assert len(fresh.blocks) == 4


# -- files.write_with: a writer of its own (safetensors' save_file for streamed shards) ---------------

def test_write_with_a_failing_writer_leaves_nothing(tmp_path):
    from pangkas.files import write_with

    def half_then_fail(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    (tmp_path / "old.bin").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        write_with(tmp_path / "old.bin", half_then_fail, overwrite=True)
    assert (tmp_path / "old.bin").read_bytes() == b"old"  # replaced whole or not at all
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.bin"]  # no temporary left behind
    with pytest.raises(pangkas.PangkasError, match="already exists"):
        write_with(tmp_path / "old.bin", lambda tmp: tmp.write_bytes(b"new"))
    path = write_with(tmp_path / "new.safetensors", lambda tmp: safetensors.torch.save_file({"x": torch.ones(2)},
                                                                                           str(tmp)))
    assert torch.equal(safetensors.torch.load_file(path)["x"], torch.ones(2))
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # not left private like the temporary
