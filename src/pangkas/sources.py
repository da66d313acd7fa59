"""Resolving a MODEL argument of the CLI into a model and example inputs.

MODEL is ``torchvision:NAME``, a local Hugging Face model directory, ``package.module:factory``,
a file written by ``pangkas.save`` (rebuilt from the source it records), or, only with
``allow_pickle=True``, a pickled ``torch.save(model)`` file.

A file's recorded source is data, not an instruction: it may name ``torchvision:NAME``, a builder
in ``SAFE_BUILDERS`` or a Hugging Face directory (read by pangkas's own loader, none of its code
runs); any other module is imported only with ``trust_source=True`` (CLI: ``--trust-source``).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import PangkasError
from .io import load, read_metadata

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")
# Factories a saved file may name without --trust-source: pangkas's own, which build a fixed model.
SAFE_BUILDERS = frozenset({"pangkas.demo:digits_cnn"})


@dataclass
class Source:
    model: nn.Module
    example_inputs: Any
    spec: str | None  # how to rebuild the architecture (recorded in saved files); None for pickles
    input_shape: tuple[int, ...]
    directory: Path | None = None  # a Hugging Face model directory (for its tokenizer)


def _torchvision(name: str) -> nn.Module:
    try:
        import torchvision
    except ImportError as exc:
        raise PangkasError("torchvision:NAME needs torchvision: pip install 'pangkas[vision]'") from exc
    try:
        return torchvision.models.get_model(name, weights=None)
    except ValueError as exc:
        raise PangkasError(f"torchvision has no model {name!r}; see "
                           "torchvision.models.list_models()") from exc


def _factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise PangkasError(f"cannot import {spec!r} as package.module:factory: {exc}") from exc
    if not callable(factory):
        raise PangkasError(f"{spec} is a {type(factory).__name__}, not a factory that builds a model")
    try:
        model = factory()
    except Exception as exc:
        raise PangkasError(f"{spec}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise PangkasError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _huggingface(directory: Path) -> tuple[nn.Module, Any]:
    try:
        import transformers

        from .integrations.hf_directory import from_pretrained
    except ImportError as exc:
        raise PangkasError("Hugging Face directories need transformers: pip install 'pangkas[hf]'") from exc
    # The CLI shows its own progress; transformers' log records go to the root logger, where the
    # CLI collects them (stderr carries one line on failure).
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    try:
        config = transformers.AutoConfig.from_pretrained(directory)
        architectures = getattr(config, "architectures", None) or []
        cls = next((getattr(transformers, a) for a in architectures if hasattr(transformers, a)),
                   None) or transformers.AutoModel._model_mapping[type(config)]
        return from_pretrained(cls, directory), config
    except PangkasError:
        raise
    except Exception as exc:
        raise PangkasError(f"{directory} does not load as a Hugging Face model: "
                           f"{type(exc).__name__}: {exc}") from exc


def _hf_inputs(config, input_shape: tuple[int, ...] | None) -> tuple[Any, tuple[int, ...]]:
    vision = getattr(config, "image_size", None)
    if vision and not hasattr(config, "vocab_size"):
        shape = input_shape or (1, getattr(config, "num_channels", 3), vision, vision)
        return {"pixel_values": torch.randn(shape)}, shape
    shape = input_shape or (1, min(128, getattr(config, "max_position_embeddings", 128)))
    return {"input_ids": torch.randint(0, config.vocab_size, shape)}, shape


def resolve(spec: str, *, weights: str | None = None, allow_pickle: bool = False,
            input_shape: tuple[int, ...] | None = None, trust_source: bool = False) -> Source:
    """Build the model MODEL names, with example inputs of ``input_shape`` (images default to
    1x3x224x224, token ids to 1x128). ``trust_source``: a saved file may name any factory."""
    path = Path(spec)
    default_shape = (1, 3, 224, 224)
    if spec.startswith("torchvision:"):
        model = _torchvision(spec.split(":", 1)[1])
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise PangkasError(f"{path} is a directory without config.json: not a Hugging Face model")
        model, config = _huggingface(path)
        inputs, shape = _hf_inputs(config, input_shape)
        model = _load_weights(model, weights)
        return Source(model, inputs, str(path.resolve()), shape, path)
    elif path.suffix == ".safetensors":
        if weights is not None:
            raise PangkasError(f"{path} carries its own weights; --weights applies to a MODEL built "
                               "from torchvision:NAME, a factory or a Hugging Face directory")
        return _saved(path, input_shape, trust_source)
    elif path.suffix in PICKLE_SUFFIXES:
        model = _pickled(path, allow_pickle)
        spec = None
    elif ":" in spec and not path.exists():
        model = _factory(spec)
    else:
        raise PangkasError(
            f"cannot tell what MODEL {spec!r} is; use torchvision:NAME, a Hugging Face directory, "
            "package.module:factory, a .safetensors file written by pangkas, or a pickled "
            ".pt file with --allow-pickle"
        )
    model = _load_weights(model, weights)
    shape = input_shape or default_shape
    return Source(model, torch.randn(shape), spec, shape)


def _load_weights(model: nn.Module, weights: str | None) -> nn.Module:
    """``model`` with the weights of a file (an int8-static file loads as a new graph)."""
    return model if weights is None else load(weights, model)


def _pickled(path: Path, allow_pickle: bool) -> nn.Module:
    if not allow_pickle:
        raise PangkasError(
            f"{path} is a pickle; loading one can run arbitrary code. Pass --allow-pickle only if "
            "you trust it, or save with pangkas.save / safetensors instead"
        )
    try:
        model = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as exc:
        raise PangkasError(f"cannot unpickle {path}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise PangkasError(f"{path} holds a {type(model).__name__}, not a whole nn.Module "
                           "(a state dict needs its architecture: use package.module:factory --weights)")
    return model


def _saved(path: Path, input_shape: tuple[int, ...] | None, trust_source: bool) -> Source:
    metadata = read_metadata(path)
    spec = metadata.get("source")
    if not spec:
        raise PangkasError(f"{path} does not record its architecture; pass it as "
                           f"package.module:factory --weights {path}")
    _check_recorded(path, spec, trust_source)
    shape = input_shape or _recorded_shape(path, metadata.get("input_shape"))
    source = resolve(spec, input_shape=shape)
    source.model = load(path, source.model)  # an int8-static file loads as a new graph
    return source


def _check_recorded(path: Path, spec: str, trust_source: bool) -> None:
    """Refuse a recorded source that would import code or unpickle, unless trusted."""
    if spec.endswith(".safetensors") or Path(spec).suffix in PICKLE_SUFFIXES:
        raise PangkasError(f"{path} records another file ({spec}) as its source; refusing to follow it")
    if spec.startswith("torchvision:") or spec in SAFE_BUILDERS or trust_source:
        return
    if Path(spec).is_absolute() and (Path(spec) / "config.json").is_file():
        return  # a Hugging Face directory: configs and weights only, no code of its own runs
    module = spec.partition(":")[0]
    raise PangkasError(f"{path} asks to import module {module!r} to build its model ({spec}); pangkas "
                       "imports a module named by a file only with --trust-source (trust_source=True)")


def _recorded_shape(path: Path, recorded: str | None) -> tuple[int, ...] | None:
    if recorded is None:
        return None
    try:
        shape = json.loads(recorded)
    except json.JSONDecodeError:
        shape = None
    if not (isinstance(shape, list) and shape and all(type(d) is int and d > 0 for d in shape)):
        raise PangkasError(f"{path} records an invalid input_shape {recorded!r}; pass --input-shape")
    return tuple(shape)


def describe(source: Source) -> dict[str, str]:
    """Metadata that lets ``resolve`` rebuild this model from a saved file."""
    described = {"input_shape": json.dumps(list(source.input_shape))}
    if source.spec is not None:  # a pickle has no rebuildable source
        described["source"] = source.spec
    return described


def calibration_batches(source: Source, data: str | None, batch_size: int) -> list:
    """Batches for scoring: from a .safetensors file of inputs, a .txt file of texts (Hugging
    Face models, tokenized with the model's tokenizer), or random inputs like the example."""
    if batch_size < 1:
        raise PangkasError(f"--batch-size must be >= 1, got {batch_size}")
    if data is None:
        example = source.example_inputs
        return [torch.randn_like(example) if isinstance(example, torch.Tensor) else example for _ in range(4)]
    path = Path(data)
    if not path.is_file():
        raise PangkasError(f"no such data file: {path}")
    if path.suffix == ".txt":
        return _text_batches(source, path, batch_size)
    if path.suffix != ".safetensors":
        raise PangkasError(f"--data must be a .safetensors or .txt file, got {path.name}")
    tensors = _read_tensors(path)
    if not tensors:
        raise PangkasError(f"{path} holds no tensors")
    if any(t.ndim == 0 for t in tensors.values()):
        raise PangkasError(f"tensors in {path} must have a first dim (the samples); it holds a scalar")
    sizes = {t.shape[0] for t in tensors.values()}
    if len(sizes) != 1:
        raise PangkasError(f"tensors in {path} must share their first dim (the samples), got {sorted(sizes)}")
    n = sizes.pop()
    batches = []
    for start in range(0, n, batch_size):
        part = {k: t[start:start + batch_size] for k, t in tensors.items()}
        batches.append(next(iter(part.values())) if len(part) == 1 else part)
    return batches


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PangkasError(f"{path} is not a readable safetensors file: {exc}") from exc


def _text_batches(source: Source, path: Path, batch_size: int) -> list:
    if source.directory is None:
        raise PangkasError("a .txt data file needs a Hugging Face model directory (for its tokenizer)")
    import transformers

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise PangkasError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise PangkasError(f"{path} has no lines of text")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.directory)
    except Exception as exc:
        raise PangkasError(f"{source.directory} has no usable tokenizer for a .txt data file: "
                           f"{type(exc).__name__}: {exc}") from exc
    return [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=128,
                           return_tensors="pt")) for i in range(0, len(texts), batch_size)]


def check_runs(source: Source) -> None:
    """Raise PangkasError unless the model runs on its example inputs (a wrong --input-shape)."""
    from .inputs import call_model
    from .modules import evaluating

    try:
        with evaluating(source.model), torch.no_grad():
            call_model(source.model, source.example_inputs)
    except Exception as exc:
        raise PangkasError(f"the model does not run on example inputs of shape "
                           f"{'x'.join(map(str, source.input_shape))} ({type(exc).__name__}: {exc}); "
                           "check --input-shape") from exc


def save_pretrained(source: Source, out: str, *, overwrite: bool = False, overwrite_input: bool = False) -> Path:
    """Write a pruned Hugging Face model as a directory with every other file of the source
    directory (tokenizer, sentence-transformers pooling...)."""
    from .integrations.hf_directory import save_pretrained as save_directory

    if source.directory is None:
        raise PangkasError("a Hugging Face output directory needs a Hugging Face MODEL directory")
    return save_directory(source.model, out, files_from=source.directory, overwrite=overwrite,
                          overwrite_input=overwrite_input)
