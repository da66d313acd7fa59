"""int8 ONNX files made by onnxruntime's own quantizer (``onnxruntime.quantization``), for models
that will run in onnxruntime:

- ``int8-static``: activation scales calibrated on data (min/max), int8 weights with a scale per
  output channel, uint8 activations, QuantizeLinear/DequantizeLinear pairs around every node it
  quantizes (QDQ, which onnxruntime fuses into its int8 kernels and other runtimes read): CNNs.
- ``int8-dynamic``: MatMul/Gemm weights in int8 (a scale per output channel), activations
  quantized at run time: transformers and MLPs, no calibration.

On ResNet-50 in onnxruntime the static file runs 1.6x to 2.2x faster than torch's int8 graph
exported to ONNX (``benchmarks/quantize.py``), which is why ``export_onnx`` quantizes this way.
pangkas names each compute node by the module it came from, so ``include`` / ``exclude`` and the
report speak of layers, not of ONNX node ids.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import PangkasError

COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # the nodes with weights whose type the report states
SCHEMES = ("int8-static", "int8-dynamic")
DYNAMIC_OPS = ("MatMul", "Gemm")  # Linear layers, as in pangkas.quantize's int8-dynamic; convolutions: int8-static


def node_modules(proto) -> dict[str, str]:
    """Each compute node's module name: its weight's name where the exporter kept it
    (``layer1.0.conv1.weight``: batch norms fold into convolutions under the conv's weight name),
    else the innermost module scope the exporter recorded (a Linear's MatMul reads a transposed
    copy of its weight); the node's own name where neither is known."""
    initializers = {i.name for i in proto.graph.initializer}
    names = {}
    for node in proto.graph.node:
        if node.op_type not in COMPUTE:
            continue
        weight = node.input[1] if len(node.input) > 1 else ""
        if weight in initializers and weight.endswith(".weight"):
            names[node.name] = weight[: -len(".weight")]
        else:
            names[node.name] = _scope(node) or node.name
    return names


def _scope(node) -> str:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)  # a list of strings, as the exporter writes it
            except (ValueError, SyntaxError):
                return ""
            # cumulative module paths, then the op: ['', 'encoder', ..., 'encoder.layer.0.output.dense', 'linear']
            return scopes[-2] if len(scopes) >= 2 else ""
    return ""


def quantize_onnx(data: bytes, scheme: str, feeds: list[dict], allowed: Callable[[str], bool]
                  ) -> tuple[bytes, dict[str, str]]:
    """``data`` (a float ONNX file's bytes, with the exporter's node metadata) quantized to int8 by
    onnxruntime with ``scheme`` (one of ``SCHEMES``), ``int8-static`` calibrated on ``feeds`` (input
    name -> numpy array, one dict per batch); compute nodes whose module ``allowed`` refuses stay
    float. Returns the file (node metadata dropped) and, per compute node's module, ``"int8"`` or
    why it stayed in floating point."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="pangkas-onnx-") as folder:
        source, prepared, output = (Path(folder) / n for n in ("float.onnx", "prepared.onnx", "int8.onnx"))
        source.write_bytes(data)
        try:  # shape inference + basic graph optimisation, which onnxruntime recommends before quantizing
            with quiet_logs(), _working_in(folder):  # where shape inference gives up it leaves files in the cwd
                quant_pre_process(source, prepared)
        except Exception:  # noqa: BLE001 -- an optimisation: the unprocessed graph quantizes as well, just slower
            prepared = source
        # the nodes the quantizer sees, named from the export (pre-processing keeps node names but may
        # drop the exporter's notes); a node pre-processing made is named from its own weight or id
        exported = node_modules(onnx.load_from_string(data))
        modules = {node: exported.get(node, name)
                   for node, name in node_modules(onnx.load(prepared, load_external_data=False)).items()}
        excluded = {node for node, module in modules.items() if not allowed(module)}
        try:
            with quiet_logs():
                _quantize(scheme, prepared, output, feeds, sorted(excluded))
        except Exception as exc:  # noqa: BLE001 -- the quantizer's message names the node or the input
            raise PangkasError(f"onnxruntime's quantizer failed: {str(exc).strip().splitlines()[0]}") from exc
        proto = onnx.load(output)
    layers = _layers(proto, modules, excluded, scheme)
    return without_metadata(proto).SerializeToString(), layers


def _quantize(scheme: str, source: Path, output: Path, feeds: list[dict], excluded: list[str]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_dynamic, quantize_static

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(feeds)

        def get_next(self):
            return next(self.batches, None)

    if scheme == "int8-static":
        quantize_static(source, output, Feeds(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded)
    else:
        quantize_dynamic(source, output, per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=list(DYNAMIC_OPS), nodes_to_exclude=excluded)


@contextlib.contextmanager
def _working_in(folder: str):
    """Run with ``folder`` as the working directory, and put the caller's back."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def quiet_logs():
    """Warnings logged on the way to a file kept quiet: onnxruntime's quantizer logs its notes on the
    root logger (advice, a per-channel axis it skipped), the ONNX exporter's optimiser an op it could
    not fold; lines on every run that tell the user nothing the check and report do not."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def without_metadata(proto):
    """``proto`` with its nodes' metadata (each node's Python origin) dropped: it helps debug an
    export, not run it, and in a small model it outweighs the weights."""
    for node in proto.graph.node:
        del node.metadata_props[:]
    return proto


def _layers(proto, modules: dict[str, str], excluded: set[str], scheme: str) -> dict[str, str]:
    """Per compute node's module: "int8" or why not. Static: int8 where its inputs arrive through
    DequantizeLinear. Dynamic: int8 where the quantizer replaced the node by integer ones."""
    dequantized = {out for node in proto.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    float_nodes = {node.name: node for node in proto.graph.node if node.op_type in COMPUTE}
    layers = {}
    for node, name in modules.items():
        if name in layers:
            name = f"{name} [{node}]"  # a module called twice, or two nodes in one scope
        left = float_nodes.get(node)
        if node in excluded:
            layers[name] = "excluded"
        elif scheme == "int8-dynamic" and left is not None and left.op_type not in DYNAMIC_OPS:
            layers[name] = "int8-dynamic quantizes MatMul/Gemm; use int8-static for convolutions"
        elif scheme == "int8-dynamic":
            layers[name] = "int8" if left is None else "left in floating point by onnxruntime's quantizer"
        elif left is not None and all(i in dequantized for i in left.input[:2] if i):
            layers[name] = "int8"
        else:
            layers[name] = "left in floating point by onnxruntime's quantizer"
    return layers
