"""int8-static models: torchao's PT2E graph built from a float model, and what a file keeps of one.

A converted graph computes with tensors (int8 weights, per-channel scales and zero points, float
biases) and with the activations' scales and zero points written into its quantize / dequantize
calls as numbers. ``build`` makes the graph and records how it was made (the float model's tensor
shapes, the example input's shapes, the layers kept in float). A file keeps those tensors, those
numbers and that record; ``rebuild`` makes the graph again from the user's architecture the same
way, checks it is the same graph (a digest of its ops and tensors) and puts the stored values in.
No code and no op comes from the file: only numbers and shapes.
"""

from __future__ import annotations

import hashlib
import operator

import torch
from torch import nn

from .errors import PangkasError
from .inputs import call_model, export_call
from .markers import EDITS, RESHAPED

RECORD = "_pangkas_int8_static"  # on a graph built here: how to build it again
LITERALS = (":floats", ":ints")  # the names a file stores the graph's numeric arguments under
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}


def build(source: nn.Module, batches: list, example, float_layers: list[str]) -> torch.fx.GraphModule:
    """``source`` exported at ``example``, annotated for the x86 inductor backend (the layers named
    in ``float_layers`` left out), calibrated on ``batches`` and converted; tensors the converted
    graph no longer reads (the float weights it replaced by int8 ones) are dropped."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    graph = _exported(source, example)
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    for name in float_layers:
        quantizer.set_module_name_qconfig(name, None)
    try:
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for batch in batches:
                call_model(prepared, batch)
        quantized = convert_pt2e(prepared)
        allow_exported_model_train_eval(quantized)  # .eval() and .train() work as on any model
        quantized.eval()
        for module in quantized.modules():  # the graph is in eval mode; its flags did not say so
            module.training = False
    except Exception as exc:  # noqa: BLE001 -- torchao's message names the op
        raise PangkasError(f"int8-static failed in torchao: {exc}") from exc
    _drop_unread(quantized)
    setattr(quantized, RECORD, {
        "shapes": {key: list(t.shape) for key, t in source.state_dict().items()},
        "example": _spec(source, example), "float_layers": sorted(float_layers),
        "edits": list(getattr(source, EDITS, [])), "reshaped": bool(getattr(source, RESHAPED, False))})
    return quantized


def _exported(model: nn.Module, example) -> torch.fx.GraphModule:
    """``model`` exported at ``example`` with dim 0 of every tensor input dynamic (calibration
    batches may differ in size), with one partition per call site of a module (see below)."""
    args, kwargs, shapes = export_call(model, example)
    try:
        exported = torch.export.export(model, args, kwargs, dynamic_shapes=shapes)
    except Exception as exc:  # noqa: BLE001 -- export's own message says what it cannot capture
        raise PangkasError(f"int8-static needs torch.export to capture the model, and it failed: "
                           f"{str(exc).splitlines()[0]}") from exc
    graph = exported.module()
    _one_partition_per_call(graph, model)
    return graph


def _one_partition_per_call(graph: torch.fx.GraphModule, model: nn.Module) -> None:
    """Give the nodes of each later call of a module used twice (ResNet's shared ReLU) their own
    source: the quantizer groups nodes into patterns by module name, and two calls of one module
    would otherwise make one pattern with two outputs, which it refuses."""
    for node in graph.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack or node.meta.get("source_fn_stack") is not None:
            continue
        key, (name, _) = list(stack.items())[-1]
        if "@" in key:  # export marks the second and later calls of a module so
            node.meta["source_fn_stack"] = [(key, type(model.get_submodule(name)))]


def _drop_unread(graph: torch.fx.GraphModule) -> None:
    read = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name, _ in [*graph.named_parameters(), *graph.named_buffers()]:
        if name not in read:
            owner_name, _, attribute = name.rpartition(".")
            owner = graph.get_submodule(owner_name)
            owner._parameters.pop(attribute, None)
            owner._buffers.pop(attribute, None)


def _spec(model: nn.Module, example) -> dict | None:
    """The example's tensors as {"args": [[shape, dtype], ...], "kwargs": {name: [shape, dtype]}};
    None when it holds anything else (a file cannot rebuild such a graph)."""
    args, kwargs, _ = export_call(model, example)
    values = [*args, *kwargs.values()]
    if not all(isinstance(v, torch.Tensor) and str(v.dtype).removeprefix("torch.") in DTYPES for v in values):
        return None
    describe = lambda t: [list(t.shape), str(t.dtype).removeprefix("torch.")]  # noqa: E731
    return {"args": [describe(a) for a in args], "kwargs": {k: describe(v) for k, v in kwargs.items()}}


def _zeros(spec: dict):
    """A batch of zeros shaped as ``spec`` describes."""
    make = lambda shape_dtype: torch.zeros(shape_dtype[0], dtype=DTYPES[shape_dtype[1]])  # noqa: E731
    if spec["kwargs"]:
        return {name: make(v) for name, v in spec["kwargs"].items()}
    return tuple(make(a) for a in spec["args"])


# -- what a file keeps -------------------------------------------------------------------------

def is_static(model: nn.Module) -> bool:
    return isinstance(model, torch.fx.GraphModule) and any(
        node.op == "call_function" and getattr(node.target, "namespace", None) == "quantized_decomposed"
        for node in model.graph.nodes)


def stored(graph: torch.fx.GraphModule) -> tuple[dict[str, torch.Tensor], dict]:
    """(the tensors to store, by attribute path, with the numeric arguments under ``LITERALS``; a
    copy of the graph's record with its digest), or PangkasError for a graph ``build`` did not make."""
    record = getattr(graph, RECORD, None)
    if record is None:
        raise PangkasError("this int8-static graph was not made by pangkas.quantize, so nothing says how to "
                           "rebuild it: quantize the float model with pangkas.quantize, or use pangkas.export_onnx")
    if record["example"] is None:
        raise PangkasError("this int8-static graph was exported with inputs that are not all tensors, which a "
                           "file cannot describe: write it with pangkas.export_onnx")
    tensors = {target: operator.attrgetter(target)(graph) for target in _attributes(graph)}
    floats, ints = _literals(graph)
    tensors[LITERALS[0]] = torch.tensor(floats, dtype=torch.float64)
    tensors[LITERALS[1]] = torch.tensor(ints, dtype=torch.int64)
    return tensors, {**record, "digest": digest(graph)}


def check_record(record, entries: dict) -> None:
    """PangkasError unless ``record`` (from a file's header) has the shape ``stored`` gives it."""
    def sizes(v) -> bool:
        return isinstance(v, list) and all(type(n) is int and n >= 0 for n in v)

    def tensor(v) -> bool:
        return isinstance(v, list) and len(v) == 2 and sizes(v[0]) and v[1] in DTYPES

    example = record.get("example") if isinstance(record, dict) else None
    if not (isinstance(record, dict) and set(record) == {"shapes", "example", "float_layers", "digest"}
            and isinstance(record["shapes"], dict) and all(sizes(v) for v in record["shapes"].values())
            and isinstance(example, dict) and set(example) == {"args", "kwargs"}
            and isinstance(example["args"], list) and all(tensor(v) for v in example["args"])
            and isinstance(example["kwargs"], dict) and all(tensor(v) for v in example["kwargs"].values())
            and isinstance(record["float_layers"], list) and all(isinstance(n, str) for n in record["float_layers"])
            and isinstance(record["digest"], str)):
        raise PangkasError('corrupt pangkas header: "static" is not {shapes, example: {args, kwargs}, '
                           'float_layers, digest}')
    if not set(LITERALS) <= set(entries):
        raise PangkasError(f"corrupt pangkas header: an int8-static file must store {' and '.join(LITERALS)}")


def rebuild(model: nn.Module, record: dict, tensors: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    """The graph ``build`` makes from ``model`` (already cut to the file's shapes) as the file
    describes it, with the file's tensors and numbers in it."""
    example = _zeros(record["example"])
    graph = build(model.eval(), [example], example, list(record["float_layers"]))  # quantize exports in eval mode
    if digest(graph) != record["digest"]:
        raise PangkasError(f"{type(model).__name__} does not rebuild the int8-static graph the file was saved "
                           "from (another architecture, or another torch / torchao version)")
    with torch.no_grad():
        for target in _attributes(graph):
            into, value = operator.attrgetter(target)(graph), tensors.get(target)
            if value is None or value.shape != into.shape or value.dtype != into.dtype:
                made = f"{into.dtype} {tuple(into.shape)}"
                got = "nothing" if value is None else f"{value.dtype} {tuple(value.shape)}"
                raise PangkasError(f"the int8-static graph reads {target} as {made}; the file has {got}")
            into.copy_(value)
    floats, ints = (tensors[name] for name in LITERALS)
    want = [len(values) for values in _literals(graph)]
    if [floats.shape, ints.shape, floats.dtype, ints.dtype] != [(want[0],), (want[1],), torch.float64, torch.int64]:
        raise PangkasError(f"the int8-static graph's quantize steps take {want[0]} float and {want[1]} integer "
                           f"numbers; the file stores {floats.dtype} {tuple(floats.shape)} and "
                           f"{ints.dtype} {tuple(ints.shape)}")
    _set_literals(graph, floats.tolist(), ints.tolist())
    return graph


def _attributes(graph: torch.fx.GraphModule) -> list[str]:
    return list(dict.fromkeys(node.target for node in graph.graph.nodes if node.op == "get_attr"))


def _numbered(graph: torch.fx.GraphModule):
    """The quantize / dequantize calls, in graph order: their numeric arguments are the scales and
    zero points calibration chose."""
    return [node for node in graph.graph.nodes
            if node.op == "call_function" and getattr(node.target, "namespace", None) == "quantized_decomposed"]


def _is_number(a, kind: type) -> bool:
    return type(a) is kind  # bool is not an int here


def _literals(graph: torch.fx.GraphModule) -> tuple[list[float], list[int]]:
    nodes = _numbered(graph)
    return ([a for n in nodes for a in n.args if _is_number(a, float)],
            [a for n in nodes for a in n.args if _is_number(a, int)])


def _set_literals(graph: torch.fx.GraphModule, floats: list[float], ints: list[int]) -> None:
    floats, ints = iter(floats), iter(ints)
    for node in _numbered(graph):
        node.args = tuple(next(floats) if _is_number(a, float) else next(ints) if _is_number(a, int) else a
                          for a in node.args)
    graph.recompile()


def digest(graph: torch.fx.GraphModule) -> str:
    """A digest of the graph's ops, their arguments (but the numbers calibration chose) and its
    tensors' shapes and dtypes: equal for graphs that differ only in those values. Where the
    tensors are read does not count: it follows the order of the source model's parameters, which
    differs between a model whose masks were baked in and a fresh one."""
    numbered = set(_numbered(graph))
    parts = []
    for node in graph.graph.nodes:
        if node.op != "get_attr":
            args = [type(a).__name__ if node in numbered and type(a) in (int, float) else repr(a) for a in node.args]
            parts.append((node.op, str(node.target), args, repr(node.kwargs)))
    for target in sorted(_attributes(graph)):
        t = operator.attrgetter(target)(graph)
        parts.append((target, tuple(t.shape), str(t.dtype)))
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
