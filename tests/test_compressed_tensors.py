"""export_compressed_tensors: int8 and 2:4 Hugging Face directories, read back only through the
compressed-tensors package (its config classes and decompressors, and transformers' loader, which
calls them), never through pangkas."""

import functools
import json

import pytest
import torch
from torch import nn

pytest.importorskip("compressed_tensors")
pytest.importorskip("torchao")
transformers = pytest.importorskip("transformers")

import pangkas  # noqa: E402
from pangkas.integrations.compressed_tensors import is_two_four  # noqa: E402
from pangkas.quant_schemes import is_torchao  # noqa: E402
from pangkas.weights.masks import masked_modules  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

FORMATS = {"int8-weight-only": "pack-quantized", "int8-dynamic": "int-quantized"}
NOT_24 = "model.layers.1.mlp.down_proj"  # left out of 2:4 pruning: must be stored dense and reported so


def tiny_llama(tie: bool = False) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))


def pruned_24(model: nn.Module) -> nn.Module:
    pangkas.prune_weights(model, pattern="2:4", exclude=["lm_head", NOT_24])
    return model


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def effective(weight: torch.Tensor) -> torch.Tensor:
    """The weight the pangkas model computes with (masks applied; int8 as qdata * scale)."""
    return weight.dequantize() if is_torchao(weight) else weight.detach()


def load_through_package(directory) -> nn.Module:
    """transformers' loader: compressed-tensors applies the config and decompresses the weights
    (on the first forward pass)."""
    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def parsed_config(directory):
    from compressed_tensors.quantization import QuantizationConfig

    raw = json.loads((directory / "config.json").read_text())["quantization_config"]
    return raw, QuantizationConfig.model_validate(raw)


def decompressed_by_package(directory, names) -> dict[str, torch.Tensor]:
    """Each layer's weight as the package's own decompressor makes it from the file."""
    from compressed_tensors.compressors import BaseCompressor

    _, config = parsed_config(directory)
    scheme = config.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(config.format)
    tensors = load_file(directory / "model.safetensors")
    out = {}
    for name in names:
        local = {key[len(name) + 1:]: value for key, value in tensors.items() if key.rpartition(".")[0] == name}
        out[name] = compressor.decompress(local, scheme)["weight"]
    return out


@pytest.mark.parametrize("scheme,sparse,dtype", [
    ("int8-weight-only", False, torch.float32), ("int8-dynamic", False, torch.float32),
    ("int8-weight-only", True, torch.float32), ("int8-dynamic", True, torch.float32),
    ("int8-weight-only", True, torch.bfloat16)])
def test_int8_round_trip_through_compressed_tensors(scheme, sparse, dtype, tokens, tmp_path):
    model = tiny_llama().to(dtype)
    if sparse:
        pruned_24(model)
    quantized, _ = pangkas.quantize(model, [tokens], scheme, exclude="lm_head")
    report = pangkas.export_compressed_tensors(quantized, tmp_path / "out")
    out = tmp_path / "out"
    layers = [n for n in linear_names(quantized) if n != "lm_head"]
    assert report.format == FORMATS[scheme] and report.scheme == scheme and list(report.quantized) == layers
    assert set(report.two_four) == (set(layers) - {NOT_24} if sparse else set())

    raw, config = parsed_config(out)
    group = config.config_groups["group_0"]
    assert config.format == FORMATS[scheme] and config.ignore == ["lm_head"] and raw["sparsity_config"] == {}
    assert (group.weights.num_bits, group.weights.type, group.weights.strategy, group.weights.symmetric) == (
        8, "int", "channel", True)
    if scheme == "int8-dynamic":
        assert (group.input_activations.strategy, group.input_activations.dynamic) == ("token", True)
    else:
        assert group.input_activations is None

    # The package's decompressor gives back torchao's weights (qdata * scale) bit for bit, once in
    # the model's dtype (torchao keeps a bf16 model's scales in float32, and so does the file).
    expected = {name: effective(quantized.get_submodule(name).weight) for name in linear_names(quantized)}
    for name, weight in decompressed_by_package(out, layers).items():
        assert torch.equal(weight.to(dtype), expected[name]), name

    loaded = load_through_package(out)
    with torch.no_grad():
        logits, reference = loaded(tokens).logits, quantized(tokens).logits
    for name in linear_names(loaded):
        assert torch.equal(loaded.get_submodule(name).weight, expected[name]), name
        if sparse and name in report.two_four:
            assert is_two_four(loaded.get_submodule(name).weight)
    # Same weights; the difference is the order of float operations (torchao scales after the
    # matmul: one bf16 step, 0.004 at these logits of about 0.6) and, for int8-dynamic, how
    # activations at exactly -127.5 steps round (torchao: -127, compressed-tensors: -128), one step
    # on one value of some tokens.
    tolerance = 1e-5 if scheme == "int8-weight-only" and dtype == torch.float32 else 1e-2
    assert logits.dtype == dtype
    torch.testing.assert_close(logits, reference, atol=tolerance, rtol=0)


def test_a_2_4_float_model_is_written_plain_with_its_zeros(tokens, tmp_path):
    model = pruned_24(tiny_llama())  # masks still on
    report = pangkas.export_compressed_tensors(model, tmp_path / "out")
    layers = linear_names(model)
    assert report.format == "dense" and report.scheme is None and report.quantized == ()
    assert set(report.two_four) == set(layers) - {NOT_24, "lm_head"}
    assert not is_two_four(model.get_submodule(NOT_24).weight)
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert any(True for _ in masked_modules(model)), "the model keeps its masks"

    loaded = load_through_package(tmp_path / "out")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)

    pangkas.finalize(model)  # already-baked zeros are found the same way
    assert pangkas.export_compressed_tensors(model, tmp_path / "again").two_four == report.two_four


def test_sharded_weights_are_rewritten_with_their_index(tokens, tmp_path, monkeypatch):
    save = transformers.PreTrainedModel.save_pretrained
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained",
                        functools.partialmethod(save, max_shard_size="40KB"))
    quantized, _ = pangkas.quantize(tiny_llama(), None, "int8-weight-only", exclude="lm_head")
    pangkas.export_compressed_tensors(quantized, tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "model.layers.0.mlp.up_proj.weight_packed" in index["weight_map"]
    assert "model.layers.0.mlp.up_proj.weight" not in index["weight_map"]
    loaded = load_through_package(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, quantized(tokens).logits, atol=1e-5, rtol=0)
    weight = quantized.model.layers[0].mlp.up_proj.weight
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, weight.dequantize())


def test_a_non_empty_target_is_refused_and_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(pangkas.PangkasError, match="not empty"):
        pangkas.export_compressed_tensors(tiny_llama(), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    pangkas.export_compressed_tensors(tiny_llama(), out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine" and (out / "config.json").exists()


def test_an_interrupt_mid_write_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    # Only pangkas's rewrite of the int8 layers calls it at run time (transformers bound its own copy).
    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    quantized, _ = pangkas.quantize(tiny_llama(), None, "int8-weight-only", exclude="lm_head")
    with pytest.raises(KeyboardInterrupt):
        pangkas.export_compressed_tensors(quantized, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_refusals_name_the_problem_and_write_nothing(tmp_path):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerTensor

    def linear_in(part):
        return lambda module, name: isinstance(module, nn.Linear) and part in name

    mixed = tiny_llama()
    quantize_(mixed, Int8WeightOnlyConfig(), filter_fn=linear_in("mlp"))
    quantize_(mixed, Int8DynamicActivationInt8WeightConfig(), filter_fn=linear_in("self_attn"))
    per_tensor = tiny_llama()
    quantize_(per_tensor, Int8WeightOnlyConfig(granularity=PerTensor()), filter_fn=linear_in("mlp"))
    tied, _ = pangkas.quantize(tiny_llama(tie=True), None, "int8-weight-only")  # lm_head shares the embeddings
    cases = [
        (mixed, "mixes int8-dynamic and int8-weight-only"),
        (per_tensor, "not int8 per output channel"),
        (tied, "lm_head.weight.*tied"),
        (pangkas.quantize(nn.Sequential(nn.Linear(8, 8)), None, "int8-weight-only")[0], "not a Hugging Face"),
        (torch.fx.symbolic_trace(nn.Sequential(nn.Linear(8, 8))), "int8-static"),
    ]
    for model, message in cases:
        with pytest.raises(pangkas.PangkasError, match=message):
            pangkas.export_compressed_tensors(model, tmp_path / "out")
        assert list(tmp_path.iterdir()) == []


def test_save_pretrained_points_int8_models_here(tmp_path):
    quantized, _ = pangkas.quantize(tiny_llama(), None, "int8-weight-only")
    with pytest.raises(pangkas.PangkasError, match="export_compressed_tensors"):
        pangkas.save_pretrained(quantized, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_files_from_brings_the_tokenizer_not_its_weights(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "tokenizer.json").write_text("{}")
    (source / "model.safetensors").write_bytes(b"not these weights")
    quantized, _ = pangkas.quantize(tiny_llama(), None, "int8-weight-only", exclude="lm_head")
    pangkas.export_compressed_tensors(quantized, tmp_path / "out", files_from=source)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    assert "model.layers.0.mlp.up_proj.weight_packed" in load_file(tmp_path / "out" / "model.safetensors")
