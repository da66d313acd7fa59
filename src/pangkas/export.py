"""ONNX files that onnxruntime runs: float models, pruned ones, the int8 graphs of
``quantize(..., "int8-static")`` (their quantize/dequantize steps become ONNX QuantizeLinear /
DequantizeLinear, which onnxruntime fuses into int8 kernels), and float models quantized to int8
by onnxruntime's own quantizer on the way out (``quantize="int8-static"`` or ``"int8-dynamic"``:
the faster files in onnxruntime).

The export is torch's own (``torch.onnx.export``, the ``torch.export``-based exporter); pangkas
adds dynamic batch (and token-sequence) dimensions, a check that onnxruntime computes what the
model computes before anything is written, and an atomic write.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .distortion import Fidelity
from .errors import PangkasError
from .files import check_file_target, write_file
from .inputs import call_model, export_call
from .layers import _batches
from .modules import ModuleFilter, Selector, evaluating
from .onnx_quant import SCHEMES as ONNX_SCHEMES
from .onnx_quant import quantize_onnx, quiet_logs, without_metadata
from .outputs import primary_tensor
from .quant_schemes import is_torchao
from .quant_static import is_static
from .quantize import CONVS, QuantizeReport

__all__ = ["OnnxExport", "OnnxRuntimeModule", "export_onnx", "onnx_bytes"]

MIN_COSINE = 0.99  # below this, onnxruntime computes something else than the model: nothing is written
# an int8 file made by onnxruntime differs by its quantization error too, and raw outputs (a transformer's
# hidden states) move further than pooled ones; below this it computes something else than quantization explains
MIN_INT8_COSINE = 0.9
WEIGHTED = (nn.Linear, *CONVS, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)  # ONNX's COMPUTE nodes


@dataclass(frozen=True)
class OnnxExport:
    """What ``export_onnx`` wrote, and how onnxruntime's outputs on the example compare with the
    model's (nan when not checked): the largest absolute difference and the mean cosine per example;
    with ``quantize=``, ``quantization`` says per layer what is int8 and what stayed float."""

    path: Path
    bytes: int
    max_difference: float = math.nan
    cosine: float = math.nan
    quantization: QuantizeReport | None = None

    def __str__(self) -> str:
        checked = "" if math.isnan(self.cosine) else (
            f"; onnxruntime vs the model: max difference {self.max_difference:.3g}, mean cosine {self.cosine:.6f}")
        report = "" if self.quantization is None else f"\n{self.quantization}"
        return f"wrote {self.path} ({self.bytes / 2**20:.2f} MiB){checked}{report}"


def export_onnx(model: nn.Module, path: str | os.PathLike, example_inputs, *, quantize: str | None = None,
                data=None, include: Selector = None, exclude: Selector = None, check: bool = True,
                overwrite: bool = False) -> OnnxExport:
    """Write ``model`` to ``path`` (``.onnx``) as traced at ``example_inputs`` (a tensor, tuple or
    dict, as for every pangkas call), dim 0 of every tensor input dynamic. With ``check`` (needs
    onnxruntime), the file is first run in onnxruntime on ``example_inputs`` and compared with the
    model; if the outputs disagree (mean cosine under 0.99) nothing is written. An existing file is
    replaced only with ``overwrite=True``.

    ``quantize="int8-static"``: the float ``model`` is written as int8, quantized by onnxruntime's
    own quantizer with activation scales calibrated on ``data`` (batches, as everywhere);
    ``"int8-dynamic"``: its MatMul/Gemm weights in int8, activations quantized at run time (``data``
    only checks the result). ``include`` / ``exclude`` choose the layers it may quantize (module
    names or types). The file is always checked, and the result's ``quantization`` reports every
    layer with the mean cosine to the model on (up to four of) the batches."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise PangkasError(f"an ONNX file's name ends in .onnx, got {path}")
    check_file_target(path, overwrite=overwrite)
    file, difference, cosine, report = _onnx(model, example_inputs, check, quantize, data, include, exclude)
    write_file(path, file, overwrite=overwrite)
    return OnnxExport(path, len(file), difference, cosine, report)


def onnx_bytes(model: nn.Module, example_inputs, *, check: bool = True, quantize: str | None = None, data=None,
               include: Selector = None, exclude: Selector = None) -> tuple[bytes, float, float]:
    """``export_onnx``'s file as bytes, with onnxruntime's largest difference and mean cosine to
    the model on ``example_inputs`` (nan without ``check``); PangkasError if they disagree."""
    return _onnx(model, example_inputs, check, quantize, data, include, exclude)[:3]


def _onnx(model, example, check, quantize, data, include, exclude) -> tuple[bytes, float, float, QuantizeReport | None]:
    with evaluating(model):  # a deployment file computes in eval mode (dropout off, batch norm's running stats)
        return _evaluated(model, example, check, quantize, data, include, exclude)


def _evaluated(model, example, check, quantize, data, include, exclude):
    if any(is_torchao(p) for p in model.parameters()):
        raise PangkasError("weights quantized by torchao (int8-dynamic, int8-weight-only) run in PyTorch and do "
                           "not export to ONNX: save them with pangkas.save, or export the float model with "
                           "quantize='int8-dynamic' (onnxruntime's quantizer)")
    if quantize is None:
        if data is not None or include is not None or exclude is not None:
            raise PangkasError("data, include and exclude are for quantize= (onnxruntime's quantizer)")
        file = without_metadata(_exported(model, example)).SerializeToString()
        if not check:
            return file, math.nan, math.nan, None
        return (file, *_checked(model, file, example, MIN_COSINE), None)
    file, report = _quantized(model, example, quantize, _batches(data), include, exclude)
    # nothing quantized is written unchecked
    return (file, *_checked(model, file, example, MIN_INT8_COSINE, " (int8 moved them that far: exclude the "
                                                                   "sensitive layers)"), report)


def _checked(model, file: bytes, example, least: float, hint: str = "") -> tuple[float, float]:
    """onnxruntime's largest difference and mean cosine to the model; PangkasError under ``least``."""
    difference, cosine = _compared(model, file, example)
    if not cosine >= least:
        raise PangkasError(f"onnxruntime's outputs differ from the model's (mean cosine {cosine:.4f}, max "
                           f"difference {difference:.3g}){hint}; nothing was written")
    return difference, cosine


def _quantized(model, example, scheme, batches, include, exclude) -> tuple[bytes, QuantizeReport]:
    """The float model's export, quantized by onnxruntime on ``batches``, and its per-layer report."""
    if scheme not in ONNX_SCHEMES:
        raise PangkasError(f"export_onnx quantizes with {' or '.join(ONNX_SCHEMES)} (onnxruntime's quantizer), got "
                           f"{scheme!r}; for int8-weight-only use pangkas.quantize and pangkas.save")
    if is_static(model):
        raise PangkasError("this model is already int8 (quantize(..., 'int8-static')): export it without quantize=, "
                           "or pass its float model to have onnxruntime quantize it")
    if scheme == "int8-static" and not batches:
        raise PangkasError("quantize='int8-static' calibrates activation scales on data: pass calibration batches")
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise PangkasError("quantizing an ONNX file needs onnxruntime (pip install onnxruntime)") from exc
    chosen = ModuleFilter(include, exclude, list(model.named_modules())[1:], "module")
    allowed = lambda name: _allowed(model, chosen, name)  # noqa: E731
    proto = _exported(model, example)
    float_file = proto.SerializeToString()  # with the exporter's notes: they name the layers
    _checked(model, float_file, example, MIN_COSINE)  # the export itself, before any int8 error
    names = _input_names(proto)
    feeds = [dict(zip(names, (t.detach().cpu().numpy() for t in _tensors(model, b)))) for b in batches]
    file, layers = quantize_onnx(float_file, scheme, feeds, allowed)
    _check_refusals_found(model, example, allowed, layers)
    report = QuantizeReport(scheme, layers)
    if batches:
        report.fidelity = Fidelity(model, batches[:4])(OnnxRuntimeModule(file))
    if not report.quantized:
        raise PangkasError(f"onnxruntime's quantizer left every layer of {type(model).__name__} in floating point; "
                           "nothing was written")
    return file, report


def _check_refusals_found(model: nn.Module, example, allowed, layers: dict[str, str]) -> None:
    """Every Linear / conv layer that ``include`` / ``exclude`` keep in float and that the model
    runs must have been found in the graph: one the exporter did not name would otherwise be
    quantized against the user's word."""
    found = {name.split(" [")[0] for name in layers}
    kept = [name for name, m in model.named_modules() if isinstance(m, WEIGHTED) and not allowed(name)]
    unfound = [name for name in kept if name not in found]
    if missing := sorted(_called(model, example, unfound)) if unfound else []:
        raise PangkasError(f"could not find the ONNX node of {', '.join(missing[:4])} (kept in float by include/"
                           "exclude) in the exported graph, so it cannot be kept in float; nothing was written")


def _called(model: nn.Module, example, names: list[str]) -> set[str]:
    """Which of the named modules run when ``model`` is called on ``example``."""
    called = set()
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda *_, n=n: called.add(n)) for n in names]
    try:
        with torch.no_grad():
            call_model(model, example)
    finally:
        for hook in hooks:
            hook.remove()
    return called


def _allowed(model: nn.Module, chosen: ModuleFilter, name: str) -> bool:
    try:
        module = model.get_submodule(name)
    except AttributeError:  # a node named after no module (an ONNX node id): only globs can choose it
        module = nn.Module()
    return chosen.included(name, module) and not chosen.excluded(name, module)


def _input_names(proto) -> list[str]:
    initializers = {i.name for i in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in initializers]


def _tensors(model: nn.Module, batch) -> list[torch.Tensor]:
    """A batch's tensors in the order of the exported graph's inputs."""
    args, kwargs, _ = export_call(model, batch)
    return [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]


class OnnxRuntimeModule(nn.Module):
    """An ONNX file (its bytes) run by onnxruntime behind a module's call (the model's inputs in,
    positional then keyword, the first output out as a tensor): to score and time a deployment file
    next to PyTorch models."""

    def __init__(self, data: bytes):
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as many threads as torch uses: a fair race
        self.session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def forward(self, *args, **kwargs) -> torch.Tensor:
        named = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        if not set(named) <= set(self.names):  # keywords the graph does not know by name: in order, then
            args, named = (*args, *named.values()), {}
        given = [a for a in args if isinstance(a, torch.Tensor)]
        if len(given) + len(named) != len(self.names):
            raise PangkasError(f"the ONNX graph takes {len(self.names)} inputs ({', '.join(self.names)}), got "
                               f"{len(given) + len(named)} tensors")
        inputs = {**dict(zip([n for n in self.names if n not in named], given)), **named}
        feed = {n: t.detach().cpu().numpy() for n, t in inputs.items()}
        return torch.from_numpy(self.session.run(None, feed)[0])


def _exported(model: nn.Module, example):
    """``torch.onnx.export``'s ModelProto, each node still carrying the exporter's note of its
    origin; dim 0 of every input dynamic, and the length of token inputs where the model allows."""
    calls = [export_call(model, example, sequences=True), export_call(model, example)]
    if calls[0][2] == calls[1][2]:
        calls = calls[1:]  # no token inputs
    for args, kwargs, shapes in calls:  # a model that fixes its sequence length exports with dim 0 alone
        try:
            with quiet_logs():
                return torch.onnx.export(model, args, kwargs=kwargs, dynamic_shapes=shapes, dynamo=True,
                                         verbose=False).model_proto
        except Exception as exc:  # noqa: BLE001 -- the exporter's message names the op or the size
            error = exc
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()  # the exporter colours its messages
    first = text.splitlines()[0] if text else type(error).__name__
    raise PangkasError(f"torch.onnx.export could not export {type(model).__name__}: {first}") from error


def _compared(model: nn.Module, data: bytes, example) -> tuple[float, float]:
    """(max |difference|, mean cosine per example) of onnxruntime's first output and the model's."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise PangkasError("checking the ONNX file needs onnxruntime (pip install onnxruntime), or pass "
                           "check=False") from exc
    got = OnnxRuntimeModule(data)(*_tensors(model, example))
    with torch.no_grad():
        expected = primary_tensor(call_model(model, example)).float()
    if got.shape != expected.shape:
        raise PangkasError(f"onnxruntime's output has shape {tuple(got.shape)}, the model's {tuple(expected.shape)}")
    rows = got.shape[0] if got.ndim else 1
    got = got.float()
    cosine = nn.functional.cosine_similarity(got.reshape(rows, -1), expected.reshape(rows, -1), dim=1)
    return float((got - expected).abs().max()), float(cosine.mean())
