"""ONNX files that onnxruntime runs: float models, pruned ones, and the int8 graphs of
``quantize(..., "int8-static")`` (their quantize/dequantize steps become ONNX QuantizeLinear /
DequantizeLinear, which onnxruntime fuses into int8 kernels).

The export is torch's own (``torch.onnx.export``, the ``torch.export``-based exporter); pangkas
adds a dynamic batch dimension, a check that onnxruntime computes what the model computes before
anything is written, and an atomic write.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import PangkasError
from .files import check_file_target, write_file
from .inputs import call_model, export_call
from .outputs import primary_tensor
from .quant_schemes import is_torchao

__all__ = ["OnnxExport", "OnnxRuntimeModule", "export_onnx", "onnx_bytes"]

MIN_COSINE = 0.99  # below this, onnxruntime computes something else than the model: nothing is written


@dataclass(frozen=True)
class OnnxExport:
    """What ``export_onnx`` wrote, and how onnxruntime's outputs on the example compare with the
    model's (nan when not checked): the largest absolute difference and the mean cosine per example."""

    path: Path
    bytes: int
    max_difference: float = math.nan
    cosine: float = math.nan

    def __str__(self) -> str:
        checked = "" if math.isnan(self.cosine) else (
            f"; onnxruntime vs the model: max difference {self.max_difference:.3g}, mean cosine {self.cosine:.6f}")
        return f"wrote {self.path} ({self.bytes / 2**20:.2f} MiB){checked}"


def export_onnx(model: nn.Module, path: str | os.PathLike, example_inputs, *, check: bool = True,
                overwrite: bool = False) -> OnnxExport:
    """Write ``model`` to ``path`` (``.onnx``) as traced at ``example_inputs`` (a tensor, tuple or
    dict, as for every pangkas call), dim 0 of every tensor input dynamic. With ``check`` (needs
    onnxruntime), the file is first run in onnxruntime on ``example_inputs`` and compared with the
    model; if the outputs disagree (mean cosine under 0.99) nothing is written. An existing file is
    replaced only with ``overwrite=True``."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise PangkasError(f"an ONNX file's name ends in .onnx, got {path}")
    check_file_target(path, overwrite=overwrite)
    data, difference, cosine = onnx_bytes(model, example_inputs, check=check)
    write_file(path, data, overwrite=overwrite)
    return OnnxExport(path, len(data), difference, cosine)


def onnx_bytes(model: nn.Module, example_inputs, *, check: bool = True) -> tuple[bytes, float, float]:
    """``export_onnx``'s file as bytes, with onnxruntime's largest difference and mean cosine to
    the model on ``example_inputs`` (nan without ``check``); PangkasError if they disagree."""
    if any(is_torchao(p) for p in model.parameters()):
        raise PangkasError("weights quantized by torchao (int8-dynamic, int8-weight-only) run in PyTorch and do "
                           "not export to ONNX: save them with pangkas.save, or quantize with int8-static")
    data = _serialized(model, example_inputs)
    if not check:
        return data, math.nan, math.nan
    difference, cosine = _compared(model, data, example_inputs)
    if not cosine >= MIN_COSINE:
        raise PangkasError(f"onnxruntime's outputs differ from the model's (mean cosine {cosine:.4f}, max "
                           f"difference {difference:.3g}); nothing was written")
    return data, difference, cosine


class OnnxRuntimeModule(nn.Module):
    """An ONNX file (its bytes) run by onnxruntime behind a module's call (tensor inputs in, the
    first output out as a tensor): to score and time a deployment file next to PyTorch models."""

    def __init__(self, data: bytes):
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as many threads as torch uses: a fair race
        self.session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        feed = {n: t.detach().cpu().numpy() for n, t in zip(self.names, inputs)}
        return torch.from_numpy(self.session.run(None, feed)[0])


def _serialized(model: nn.Module, example) -> bytes:
    args, kwargs, shapes = export_call(model, example)
    try:
        program = torch.onnx.export(model, args, kwargs=kwargs, dynamic_shapes=shapes, dynamo=True, verbose=False)
        proto = program.model_proto
    except Exception as exc:  # noqa: BLE001 -- the exporter's message names the op or the size
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # the exporter colours its messages
        first = text.splitlines()[0] if text else type(exc).__name__
        raise PangkasError(f"torch.onnx.export could not export {type(model).__name__}: {first}") from exc
    for node in proto.graph.node:  # each node's Python origin: helps debug an export, not run it,
        del node.metadata_props[:]  # and in a small model it outweighs the weights
    return proto.SerializeToString()


def _compared(model: nn.Module, data: bytes, example) -> tuple[float, float]:
    """(max |difference|, mean cosine per example) of onnxruntime's first output and the model's."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise PangkasError("checking the ONNX file needs onnxruntime (pip install onnxruntime), or pass "
                           "check=False") from exc
    runtime = OnnxRuntimeModule(data)
    args, kwargs, _ = export_call(model, example)
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    if len(runtime.names) != len(tensors):
        raise PangkasError(f"the ONNX graph takes {len(runtime.names)} inputs, the example has {len(tensors)} tensors")
    got = runtime(*tensors)
    with torch.no_grad():
        expected = primary_tensor(call_model(model, example)).float()
    if got.shape != expected.shape:
        raise PangkasError(f"onnxruntime's output has shape {tuple(got.shape)}, the model's {tuple(expected.shape)}")
    rows = got.shape[0] if got.ndim else 1
    got = got.float()
    cosine = nn.functional.cosine_similarity(got.reshape(rows, -1), expected.reshape(rows, -1), dim=1)
    return float((got - expected).abs().max()), float(cosine.mean())
