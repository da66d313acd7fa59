"""The quantization schemes pangkas knows, their torchao configs, and the torchao weights the
Linear-layer schemes make: what ``quantize`` applies and what ``save`` / ``load`` store and rebuild.

A stored weight is its tensors (``PARTS``) plus the scheme's name; loading quantizes a stand-in of
the same shape with that scheme's config and copies the stored tensors in, so nothing but the
names here is ever chosen by a file.
"""

from __future__ import annotations

import functools
import logging
import sys

import torch
from torch import nn

from .errors import PangkasError

SCHEMES = ("int8-dynamic", "int8-weight-only", "int8-static", "int4-weight-only")
LINEAR_ONLY = ("int8-dynamic", "int8-weight-only", "int4-weight-only")
STORED = ("int8-dynamic", "int8-weight-only")  # the schemes whose weights save/load can store
PARTS = ("qdata", "scale", "zero_point")  # the tensors of those weights (torchao's Int8Tensor)


def require_torchao():
    # torchao registers its enums with torch's pytree the old way, and torch logs a deprecation line
    # for each on import: noise on every pangkas command that quantizes.
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        import torchao
    except ImportError as exc:
        raise PangkasError("quantize needs torchao: pip install 'pangkas[quantize]'") from exc
    finally:
        pytree_log.setLevel(level)
    return torchao


def config(scheme: str):
    from torchao.quantization import Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    return {"int8-dynamic": Int8DynamicActivationInt8WeightConfig, "int8-weight-only": Int8WeightOnlyConfig,
            "int4-weight-only": Int4WeightOnlyConfig}[scheme]()


def is_torchao(t) -> bool:
    """Whether ``t`` is a torchao tensor (without importing torchao: none exists until it is)."""
    torchao_utils = sys.modules.get("torchao.utils")
    return torchao_utils is not None and isinstance(t, torchao_utils.TorchAOBaseTensor)


def quantized_weight(scheme: str, shape: tuple[int, ...], dtype: torch.dtype,
                     device: torch.device | str = "cpu") -> nn.Parameter:
    """The weight ``scheme`` gives a Linear layer with a zero weight of ``shape`` and ``dtype``, as
    torchao's ``quantize_`` makes it; its tensors are there to be overwritten."""
    require_torchao()
    from torchao.quantization import quantize_

    if len(shape) != 2:
        raise PangkasError(f"{scheme} quantizes Linear weights, which are 2-d, not {tuple(shape)}")
    stand_in = nn.utils.skip_init(nn.Linear, shape[1], shape[0], bias=False, dtype=dtype, device=device)
    with torch.no_grad():
        stand_in.weight.zero_()
    quantize_(stand_in, config(scheme))
    return stand_in.weight


def parts(weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors by name, the other attributes) of a torchao weight."""
    names, attributes = weight.__tensor_flatten__()
    return {name: getattr(weight, name) for name in names}, attributes


def scheme_of(weight: torch.Tensor) -> str:
    """The scheme of ``STORED`` that makes exactly this kind of torchao weight (same type, tensors
    and attributes as its config gives a Linear of the same width), else PangkasError."""
    names, attributes = weight.__tensor_flatten__()
    for scheme in STORED:
        try:
            kind, probe_names, probe_attributes = _made_by(scheme, weight.shape[-1], weight.dtype)
        except Exception:  # noqa: BLE001 -- torchao cannot make this scheme at this dtype: not a match
            continue
        if (type(weight) is kind and names == probe_names and attributes == probe_attributes
                and set(names) <= set(PARTS)):
            return scheme
    raise PangkasError(f"a {type(weight).__name__} weight ({attributes}) was not made by a scheme pangkas can "
                       f"save ({', '.join(STORED)}); save the float model and quantize it after loading, "
                       "or, for ONNX, quantize with int8-static and use pangkas.export_onnx")


@functools.lru_cache(maxsize=64)
def _made_by(scheme: str, width: int, dtype: torch.dtype) -> tuple[type, list[str], dict]:
    weight = quantized_weight(scheme, (1, width), dtype)
    names, attributes = weight.__tensor_flatten__()
    return type(weight), names, attributes
