"""Hugging Face directories in the compressed-tensors format, which vLLM and transformers load:
the int8 weights of ``pangkas.quantize`` as int8 tensors with a scale per output channel.

What is written (compressed-tensors 0.20):

- ``int8-weight-only``: scheme W8A16 per channel, format ``pack-quantized`` (the int8 values
  packed into int32 ``weight_packed``, ``weight_scale``, ``weight_shape``).
- ``int8-dynamic``: scheme W8A8 (weights as above; input activations int8, scaled per token at
  run time), format ``int-quantized`` (int8 ``weight`` and ``weight_scale``).
- 2:4 sparsity (from pangkas's masks or already finalized): the zeros are stored like any other
  value. compressed-tensors removed its sparse formats (``sparse-24-bitmask``) after 0.14, and vLLM
  no longer runs them: a ``sparsity_config`` that says 2:4 makes current vLLM refuse the model.
  So no sparse format or sparsity metadata is written; the report lists the 2:4 layers.

The package's own compressors make the tensors and its config classes write ``quantization_config``.
Before anything is written, every compressed layer is decompressed by the package and must give
back torchao's weight (``qdata * scale``) bit for bit.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import OperationFailed, PangkasError
from ..files import check_directory_target, staged_directory
from ..quant_schemes import is_torchao, scheme_of
from ..weights.masks import finalize, masked_modules
from .hf_directory import check_savable, directory_target, pruned_record, write_pretrained

__all__ = ["CompressedTensorsExport", "export_compressed_tensors"]

SCHEMES = ("int8-weight-only", "int8-dynamic")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class CompressedTensorsExport:
    """What ``export_compressed_tensors`` wrote. ``format``: the compressed-tensors format of the
    quantized layers (``pack-quantized`` or ``int-quantized``), or ``dense`` where nothing is quantized
    (then config.json has no ``quantization_config``). ``quantized``: Linear layers stored as int8 (the
    others are in the config's ``ignore`` list); ``two_four``: Linear layers whose weights are exactly
    2:4 (at most 2 non-zeros in every 4 consecutive inputs), stored with their zeros."""

    path: Path
    format: str
    scheme: str | None
    linear: tuple[str, ...]
    quantized: tuple[str, ...]
    two_four: tuple[str, ...]

    def __str__(self) -> str:
        what = f"{self.scheme}, compressed-tensors {self.format}" if self.scheme else "float weights, no quantization"
        return (f"wrote {self.path} ({what}): {len(self.quantized)} of {len(self.linear)} Linear layers int8, "
                f"{len(self.two_four)} exactly 2:4 (stored with their zeros)")


def export_compressed_tensors(model: nn.Module, directory: str | Path, *, files_from: str | Path | None = None,
                              overwrite: bool = False, overwrite_input: bool = False) -> CompressedTensorsExport:
    """Write a Hugging Face ``model`` (pruned, with or without masks; int8 from ``pangkas.quantize``
    with ``int8-weight-only`` or ``int8-dynamic``, or float) as a compressed-tensors directory that
    vLLM and ``from_pretrained`` load. ``files_from``: a model directory whose other files (tokenizer...)
    are copied. ``model`` is left as it was.

    A non-empty ``directory`` is refused unless ``overwrite=True``, and then only the files written
    here are replaced (nothing is deleted); a new directory appears whole or not at all.
    """
    if isinstance(model, torch.fx.GraphModule):
        raise PangkasError("an int8-static model is a torch.fx graph, not a transformers model: write it with "
                           "pangkas.export_onnx, or quantize with int8-weight-only / int8-dynamic")
    check_savable(model)
    scheme = _scheme(model)
    if scheme:
        _require_compressed_tensors()
    float_model, quantized = _dequantized_copy(model)
    linear = tuple(name for name, m in float_model.named_modules() if isinstance(m, nn.Linear))
    two_four = tuple(name for name in linear if is_two_four(float_model.get_submodule(name).weight))
    target = directory_target(model, files_from, overwrite, overwrite_input)
    out = check_directory_target(directory, **target)
    record = pruned_record(float_model)
    fmt = "dense"
    if scheme:
        qscheme, fmt = _quantization_scheme(scheme)
        compressed = {name: _compressed(qscheme, fmt, name, weight) for name, weight in quantized.items()}
    with staged_directory(out, **target) as staging:
        write_pretrained(float_model, staging, files_from, record)
        if scheme:
            _replace_weights(staging, compressed)
            ignore = [name for name in linear if name not in quantized]
            _write_quantization_config(staging, qscheme, fmt, ignore)
    return CompressedTensorsExport(out, fmt, scheme, linear, tuple(quantized), two_four)


def is_two_four(weight: torch.Tensor) -> bool:
    """Whether every 4 consecutive inputs of each output row hold at most 2 non-zeros."""
    if weight.ndim != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def _require_compressed_tensors() -> None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as exc:
        raise PangkasError("export_compressed_tensors needs the compressed-tensors package for int8 weights: "
                           "pip install 'pangkas[compressed-tensors]'") from exc


def _scheme(model: nn.Module) -> str | None:
    """The one scheme of ``SCHEMES`` that made every torchao weight of ``model``, or None if
    there are none; PangkasError for anything else."""
    schemes = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not is_torchao(weight):
            continue
        if type(module) is not nn.Linear:  # the config targets the class named "Linear"
            raise PangkasError(f"{name} is a {type(module).__name__} with a torchao weight; compressed-tensors "
                               "stores quantized Linear layers only")
        try:
            schemes[name] = scheme_of(weight)
        except PangkasError as exc:
            raise PangkasError(f"{name} has a {type(weight).__name__} weight that is not int8 per output channel "
                               f"({', '.join(SCHEMES)} from pangkas.quantize), which is what pangkas writes as "
                               "compressed-tensors") from exc
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # transformers: {tied name: its source}
    shared = [name for name in schemes if f"{name}.weight" in tied.keys() | set(tied.values())]
    if shared:  # quantized on its own, it no longer is what the config ties: the directory would not load
        raise PangkasError(f"{shared[0]}.weight is tied to another weight in the config (tie_word_embeddings); "
                           "quantized, it is a tensor of its own and the directory would not load: quantize "
                           f"with exclude={shared!r}")
    kinds = sorted(set(schemes.values()))
    if len(kinds) > 1:
        raise PangkasError(f"the model mixes {' and '.join(kinds)} layers; quantize it with one scheme")
    return kinds[0] if kinds else None


def _dequantized_copy(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of ``model`` with masks baked in and every torchao weight replaced by its float value
    (what transformers writes), and the torchao weights by module name."""
    float_model = copy.deepcopy(model)
    quantized = {}
    for name, module in float_model.named_modules():
        if is_torchao(getattr(module, "weight", None)):
            quantized[name] = module.weight
            module.weight = nn.Parameter(module.weight.dequantize(), requires_grad=False)
    if any(True for _ in masked_modules(float_model)):
        finalize(float_model)
    return float_model, quantized


def _quantization_scheme(scheme: str):
    """compressed-tensors' description of ``scheme`` (symmetric int8 weights with a scale per output
    channel, as torchao's; plus int8 inputs scaled per token at run time for int8-dynamic) and the
    format the package stores it in."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True, dynamic=False)
    inputs = (QuantizationArgs(num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True)
              if scheme == "int8-dynamic" else None)
    described = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)
    described.format = infer_module_format(nn.Linear, described)  # the package's own choice
    return described, described.format.value


def _compressed(qscheme, fmt: str, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors stores for the torchao int8 ``weight`` of layer ``name``
    (local names: ``weight_packed``, ``weight_scale``...), checked by decompressing them."""
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry(fmt)
    qdata, scale = weight.qdata.detach().cpu(), weight.scale.detach().cpu()
    # The compressor quantizes a float weight again: in float32, round(q * s / s) is exactly q.
    local = compressor.compress({"weight": qdata.float() * scale.float(), "weight_scale": scale.float()}, qscheme)
    local["weight_scale"] = scale  # torchao's scale in its own dtype: the file dequantizes as torchao does
    local = {key: value.contiguous() for key, value in local.items()}
    back = compressor.decompress(dict(local), qscheme)["weight"]
    exact = weight.dequantize().cpu()  # in the model's dtype (a bf16 model has float32 scales)
    if not torch.equal(back.to(exact.dtype), exact):
        raise OperationFailed(f"{name}: compressed-tensors decompresses its {fmt} tensors to other "
                              "values than the torchao weight; nothing was written")
    return local


def _replace_weights(staging: Path, compressed: dict[str, dict[str, torch.Tensor]]) -> None:
    """Put each layer's compressed tensors in place of its float ``weight`` in the safetensors files
    transformers wrote into ``staging`` (one file, or shards with an index)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    index = json.loads((staging / INDEX).read_text()) if (staging / INDEX).exists() else None
    files = sorted(set(index["weight_map"].values())) if index else [SINGLE]
    pending = {f"{name}.weight": name for name in compressed}
    for file in files:
        path = staging / file
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
        tensors = load_file(path)
        found = sorted(pending.keys() & tensors.keys())
        for key in found:
            name = pending.pop(key)
            old = tensors.pop(key)
            new = {f"{name}.{part}": value for part, value in compressed[name].items()}
            tensors.update(new)
            if index:
                del index["weight_map"][key]
                index["weight_map"].update(dict.fromkeys(new, file))
                index["metadata"]["total_size"] += sum(_bytes(v) for v in new.values()) - _bytes(old)
        if found:
            save_file(tensors, path, metadata=metadata)
    if pending:  # e.g. lm_head tied to the embeddings: transformers writes the shared tensor once
        raise PangkasError(f"{sorted(pending)[:3]} are not written as tensors of their own (a weight tied to "
                           "another, like lm_head to the embeddings, is stored once): quantize with those "
                           "layers excluded (exclude=[...])")
    if index:
        (staging / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _write_quantization_config(staging: Path, qscheme, fmt: str, ignore: list[str]) -> None:
    """config.json's ``quantization_config``, written by the package from its own config classes."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig(config_groups={"group_0": qscheme}, format=fmt, ignore=ignore,
                                quantization_status="compressed")
    ModelCompressor(quantization_config=config).update_config(str(staging))
