"""Pruned Hugging Face models as directories that ``from_pretrained`` loads.

Where the config can say every pruned size (uniform pruning of models that read ``head_dim``
from their config: LLaMA, Mistral, Qwen, Phi-3, ...), the directory is plain. Where it cannot
(heads of BERT/GPT-2/ViT-style attention, which derive ``head_dim``; per-layer sizes), it also
carries ``modeling_pangkas.py`` (see ``remote_code``) and loads with ``trust_remote_code=True``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from ..errors import PangkasError
from ..files import check_directory_target, staged_directory
from ..quant_schemes import is_torchao
from ..surgery.blocks import LinearStandIn
from ..weights.masks import masked_modules
from . import remote_code
from .remote_code import BUILT_WITH, RECORD

CODE_FILE = "modeling_pangkas.py"
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")
_PLAIN = (bool, int, float, str)


def is_transformers(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def base_class(model: nn.Module) -> type:
    """The transformers class of ``model`` (not the subclass that loads a pruned directory)."""
    return getattr(type(model), "pangkas_base", type(model))


def _reloaded(config_dict: dict, config_class: type):
    """The config as ``from_pretrained`` will read it, with the class's own checks."""
    return config_class.from_dict(copy.deepcopy(config_dict))


def _build(model: nn.Module, config) -> nn.Module:
    with torch.device("meta"):
        return base_class(model)._from_config(copy.deepcopy(config))


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _mismatch(model: nn.Module, built: nn.Module) -> str | None:
    want, got = _shapes(model), _shapes(built)
    for key in sorted(want.keys() | got.keys()):
        if want.get(key) != got.get(key):
            return f"{key}: model {want.get(key)}, config builds {got.get(key)}"
    return None


def config_describes(model: nn.Module) -> str | None:
    """None if a model built from ``model.config`` has exactly ``model``'s parameter shapes (so
    plain ``save_pretrained`` + ``from_pretrained`` round-trips); else the first mismatch."""
    try:
        config = _reloaded(model.config.to_dict(), type(model.config))
    except Exception as exc:
        return f"the config does not load back: {exc}"
    try:
        built = _build(model, config)
    except Exception as exc:
        return f"the config does not build a model: {exc}"
    return _mismatch(model, built)


def _plain_values(module: nn.Module) -> dict:
    values = {}
    for name, value in vars(module).items():
        if name.startswith("_") or name == "training":
            continue
        if isinstance(value, _PLAIN) or (isinstance(value, (tuple, list)) and value
                                         and all(isinstance(v, _PLAIN) for v in value)):
            values[name] = value
    return values


HEAD_SIZES = ("num_attention_heads", "num_key_value_heads", "head_dim")


def _buildable(model: nn.Module) -> tuple[nn.Module, dict]:
    """A model built from ``model``'s config with as few sizes as possible put back to what
    they were first built with (the config must still validate and build), and those sizes."""
    first = {k: v for k, v in getattr(model, BUILT_WITH, {}).items() if getattr(model.config, k, None) != v}
    problem = None
    for keys in ((), HEAD_SIZES, tuple(first)):
        changed = {k: v for k, v in first.items() if k in keys}
        config_dict = model.config.to_dict()
        config_dict.pop(RECORD, None)
        for name, value in changed.items():
            if value is None:
                config_dict.pop(name, None)
            else:
                config_dict[name] = value
        try:
            return _build(model, _reloaded(config_dict, type(model.config))), changed
        except Exception as exc:
            problem = exc
    raise PangkasError(f"cannot rebuild {type(model).__name__} from its config: {problem}")


def shape_record(model: nn.Module) -> dict:
    """What pruning changed in ``model`` relative to a model its config builds: tensor shapes,
    module attributes, config sizes (``[built, pruned]``)."""
    built, changed = _buildable(model)
    ours, theirs = dict(model.named_modules()), dict(built.named_modules())
    if ours.keys() != theirs.keys():
        extra = sorted(ours.keys() ^ theirs.keys())[:3]
        raise PangkasError(f"the pruned {type(model).__name__} has other modules than its config "
                           f"builds ({extra}); save it with pangkas.save instead")
    built_tensors = dict(built.named_parameters(remove_duplicate=False)) | dict(built.named_buffers())
    record = {"tensors": {}, "attributes": {},
              "config": {k: [v, getattr(model.config, k, None)] for k, v in changed.items()}}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if tensor.shape != built_tensors[name].shape:
            record["tensors"][name] = list(tensor.shape)
    for name, module in ours.items():
        built_values = _plain_values(theirs[name])
        diff = {k: v for k, v in _plain_values(module).items() if built_values.get(k) != v}
        if diff:
            record["attributes"][name] = diff
    remote_code.reshape(built, copy.deepcopy(record))
    problem = _mismatch(model, built)
    if problem:
        raise PangkasError(f"pangkas cannot record the pruned shapes of {type(model).__name__} "
                           f"({problem}); save it with pangkas.save instead")
    return record


def _auto_classes(model: nn.Module) -> dict[str, str]:
    """Auto classes that load ``model``'s class or its base model, by class name."""
    import transformers

    names = {base_class(model).__name__}
    base = getattr(model, "base_model", model)
    names.add(base_class(base).__name__)
    found = {}
    for auto in dir(transformers):
        mapping = getattr(getattr(getattr(transformers, auto, None), "_model_mapping", None), "_model_mapping", {})
        if auto.startswith("AutoModel") and mapping.get(model.config.model_type) in names:
            found[auto] = mapping[model.config.model_type]
    return found


def _code(classes) -> str:
    lines = [f"{name} = pruned(transformers.{name})" for name in sorted(set(classes))]
    return (Path(remote_code.__file__).read_text() + "\n\nimport transformers  # noqa: E402\n\n"
            + "\n".join(lines) + "\n")


def _input_directories(model: nn.Module, files_from: str | Path | None) -> list[Path]:
    """Directories the model was read from: what a save must never delete or write into."""
    named = [files_from, getattr(model.config, "_name_or_path", None), getattr(model, "name_or_path", None)]
    return [Path(d) for d in named if d and Path(d).is_dir()]


def save_pretrained(model: nn.Module, directory: str | Path, *, files_from: str | Path | None = None,
                    overwrite: bool = False, overwrite_input: bool = False) -> Path:
    """Write ``model`` as a directory ``from_pretrained`` loads: plain where its config says
    every pruned size, else with ``modeling_pangkas.py`` (load it with ``trust_remote_code=True``).
    ``files_from``: a model directory whose other files (tokenizer, pooling...) are copied.

    A non-empty ``directory`` is refused unless ``overwrite=True``, and then only the files
    written here are replaced (nothing is deleted); the directory the model was loaded from is
    written over only with ``overwrite_input=True``, one that contains it never. A new directory
    appears whole or not at all.
    """
    check_savable(model)
    if any(True for _ in masked_modules(model)):
        raise PangkasError("the model has weight masks; pangkas.finalize(model) first, or pangkas.save it")
    if any(is_torchao(p) for p in model.parameters()):
        raise PangkasError("the model has torchao int8 weights, which from_pretrained cannot read back: write "
                           "them with pangkas.export_compressed_tensors (vLLM and transformers load that), or "
                           "pangkas.save them")
    target = directory_target(model, files_from, overwrite, overwrite_input)
    out = check_directory_target(directory, **target)
    record = pruned_record(model)
    with staged_directory(out, **target) as staging:
        write_pretrained(model, staging, files_from, record)
    return out


def check_savable(model: nn.Module) -> None:
    """PangkasError unless ``from_pretrained`` can rebuild ``model``'s modules."""
    if not is_transformers(model):
        raise PangkasError(f"{type(model).__name__} is not a Hugging Face transformers model; use pangkas.save")
    stand_ins = [n for n, m in model.named_modules() if isinstance(m, LinearStandIn)]
    if stand_ins:  # from_pretrained would build full layers there and leave them randomly initialised
        raise PangkasError(f"{stand_ins[:3]} are linear stand-ins for removed layers (replace='linear'), which "
                           "from_pretrained cannot rebuild; save with pangkas.save(model, path) and load with "
                           "pangkas.load(path, model=a fresh instance of the original model)")


def directory_target(model: nn.Module, files_from: str | Path | None, overwrite: bool,
                     overwrite_input: bool) -> dict:
    """The options of ``check_directory_target`` / ``staged_directory`` for a save of ``model``."""
    return dict(overwrite=overwrite, inputs=_input_directories(model, files_from),
                overwrite_input=overwrite_input, copied_from=files_from)


def pruned_record(model: nn.Module) -> dict | None:
    """None where ``model``'s config says every size, else what ``modeling_pangkas.py`` needs."""
    return None if config_describes(model) is None else shape_record(model)


def write_pretrained(model: nn.Module, staging: Path, files_from: str | Path | None, record: dict | None) -> None:
    """Write ``model``'s directory into the (empty) ``staging`` directory."""
    for item in Path(files_from).iterdir() if files_from is not None else ():
        if item.name == "config.json" or item.suffix in WEIGHT_FILES or item.name.endswith(".index.json"):
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)
    sizes = remote_code.built_sizes(model.config, record) if record else contextlib.nullcontext()
    with sizes, _gguf_forgotten(model):  # a config must validate to be saved
        base_class(model).save_pretrained(model, staging)  # not the loaded record's override
    _write_config(staging, record, model)


def write_config(directory: Path, model: nn.Module) -> None:
    """``model``'s config.json in ``directory`` as ``save_pretrained`` writes it: plain where the
    config says every pruned size, else with the record and ``modeling_pangkas.py`` that do."""
    record = pruned_record(model)
    with remote_code.built_sizes(model.config, record) if record else contextlib.nullcontext():
        model.config.save_pretrained(directory)
    _write_config(directory, record, model)


@contextlib.contextmanager
def _gguf_forgotten(model: nn.Module):
    """A model loaded from a GGUF file holds de-quantized float weights, but transformers still
    marks it quantized (with GGUF, which it cannot write) and refuses to save it: while inside,
    it is marked a float model, as its weights are."""
    config = getattr(model, "config", None)
    quantization = getattr(config, "quantization_config", None)
    if getattr(quantization, "quant_method", None) != "gguf":
        yield
        return
    saved = {name: getattr(model, name, None) for name in ("hf_quantizer", "is_quantized")}
    del config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    try:
        yield
    finally:
        config.quantization_config = quantization
        for name, value in saved.items():
            setattr(model, name, value)


def _write_config(staging: Path, record: dict | None, model: nn.Module) -> None:
    path = staging / "config.json"
    saved = json.loads(path.read_text())
    saved.pop(RECORD, None)
    auto_map = {k: v for k, v in saved.pop("auto_map", {}).items() if not v.startswith("modeling_pangkas.")}
    (staging / CODE_FILE).unlink(missing_ok=True)
    if record is not None:
        for name, (built, _) in record["config"].items():
            if built is None:
                saved.pop(name, None)
        saved[RECORD] = record
        classes = _auto_classes(model)
        auto_map.update({auto: f"modeling_pangkas.{name}" for auto, name in classes.items()})
        (staging / CODE_FILE).write_text(_code(classes.values()))
    if auto_map:
        saved["auto_map"] = auto_map
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def from_pretrained(cls: type, directory: str | Path, **kwargs) -> nn.Module:
    """``cls.from_pretrained(directory)``, also for directories pangkas wrote with
    ``modeling_pangkas.py`` (read with pangkas's own copy of that code: none of theirs runs)."""
    config = json.loads((Path(directory) / "config.json").read_text())
    if RECORD in config:
        cls = remote_code.pruned(getattr(cls, "pangkas_base", cls))
    return cls.from_pretrained(directory, **kwargs)
