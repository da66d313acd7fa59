"""export_onnx(quantize="int8-static"): float models written as int8 ONNX by onnxruntime's own
quantizer, every layer reported by its module name, checked before anything is written."""

import importlib
import logging

import onnx
from onnx import numpy_helper
import pytest
import torch
from torch import nn

import pangkas
from conftest import pruned_digits
from pangkas import PangkasError
from pangkas.export import OnnxRuntimeModule

onnxruntime = pytest.importorskip("onnxruntime")
onnx_quant = importlib.import_module("pangkas.onnx_quant")
export_module = importlib.import_module("pangkas.export")


def _layers(model, kinds=(nn.Conv2d, nn.Linear)):
    return {name for name, m in model.named_modules() if isinstance(m, kinds)}


def _dequantized_inputs(path):
    """Per Conv/Gemm/MatMul node: whether its weight input arrives through DequantizeLinear."""
    graph = onnx.load(str(path)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name: n.input[1] in dequantized for n in graph.node if n.op_type in onnx_quant.COMPUTE}


def test_a_pruned_cnn_is_written_as_int8_with_every_layer_named_and_reported(tmp_path):
    model, data = pruned_digits()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pangkas.export_onnx(model, tmp_path / "float.onnx", data[0])
    result = pangkas.export_onnx(model, tmp_path / "int8.onnx", data[0], quantize="int8-static", data=data)
    report = result.quantization
    assert set(report.layers) == _layers(model) and set(report.quantized) == _layers(model)
    assert report.fidelity > 0.99 and result.cosine > 0.99 and "int8-static" in str(result)
    assert all(_dequantized_inputs(tmp_path / "int8.onnx").values())
    weights = {name: sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(tmp_path / name)).graph.initializer)
               for name in ("float.onnx", "int8.onnx")}
    assert weights["int8.onnx"] < 0.35 * weights["float.onnx"]  # int8 weights stored, not quantized at run time
    x = torch.rand(7, 1, 8, 8)  # another batch size than the calibration's
    with torch.no_grad():
        got, exact = OnnxRuntimeModule((tmp_path / "int8.onnx").read_bytes())(x), model(x)
    cosine = nn.functional.cosine_similarity(got, exact)
    assert cosine.min() > 0.98 and not torch.equal(got, exact)  # within the quantization error, and quantized
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched
    assert not any(n.metadata_props for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node)


def test_include_and_exclude_choose_layers_by_module_name_or_type(tmp_path):
    model, data = pruned_digits()
    linear = _layers(model, nn.Linear)
    first = sorted(_layers(model, nn.Conv2d))[0]
    result = pangkas.export_onnx(model, tmp_path / "a.onnx", data[0], quantize="int8-static", data=data,
                                 include=nn.Conv2d, exclude=first)
    layers = result.quantization.layers
    assert {n for n, how in layers.items() if how == "excluded"} == linear | {first}
    assert set(result.quantization.quantized) == _layers(model, nn.Conv2d) - {first}
    assert sum(not q for q in _dequantized_inputs(tmp_path / "a.onnx").values()) == len(linear) + 1
    with pytest.raises(PangkasError, match="matches no module"):
        pangkas.export_onnx(model, tmp_path / "b.onnx", data[0], quantize="int8-static", data=data, exclude="convv")
    with pytest.raises(PangkasError, match="every layer"):
        pangkas.export_onnx(model, tmp_path / "c.onnx", data[0], quantize="int8-static", data=data,
                            exclude=[nn.Conv2d, nn.Linear])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx"]


class TwoInputs(nn.Module):
    """Linear layers on 3-d inputs (the exporter writes MatMul on a transposed weight) and a
    keyword input: layers named by the exporter's scope, calibration fed by input name."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32))
        self.head = nn.Linear(32, 3)

    def forward(self, tokens, scale):
        return self.head(self.encoder(tokens) * scale)


def test_dict_batches_and_linear_layers_on_sequences(tmp_path):
    torch.manual_seed(0)
    model = TwoInputs().eval()
    data = [{"tokens": torch.randn(4, 5, 8), "scale": torch.rand(4, 5, 1) + 0.5} for _ in range(3)]
    result = pangkas.export_onnx(model, tmp_path / "t.onnx", data[0], quantize="int8-static", data=data)
    assert set(result.quantization.layers) == {"encoder.0", "encoder.2", "head"}
    assert set(result.quantization.quantized) == {"encoder.0", "encoder.2", "head"}
    batch = {"tokens": torch.randn(2, 5, 8), "scale": torch.rand(2, 5, 1) + 0.5}
    with torch.no_grad():
        got, exact = OnnxRuntimeModule((tmp_path / "t.onnx").read_bytes())(**batch), model(**batch)
    assert nn.functional.cosine_similarity(got.flatten(1), exact.flatten(1)).min() > 0.98


def test_bad_input_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    model, data = pruned_digits()
    monkeypatch.chdir(tmp_path)  # onnxruntime's calibration files must not land here either
    target = tmp_path / "out.onnx"
    with pytest.raises(PangkasError, match="int8-static or int8-dynamic"):
        pangkas.export_onnx(model, target, data[0], quantize="int8-weight-only", data=data)
    with pytest.raises(PangkasError, match="calibration batches"):
        pangkas.export_onnx(model, target, data[0], quantize="int8-static")
    with pytest.raises(PangkasError, match="not a single batch"):
        pangkas.export_onnx(model, target, data[0], quantize="int8-static", data=data[0])
    with pytest.raises(PangkasError, match="are for quantize="):
        pangkas.export_onnx(model, target, data[0], exclude="fc")
    pytest.importorskip("torchao")
    int8, _ = pangkas.quantize(model, data, "int8-static")
    with pytest.raises(PangkasError, match="already int8"):
        pangkas.export_onnx(int8, target, data[0], quantize="int8-static", data=data)
    assert list(tmp_path.iterdir()) == []


def test_a_failing_or_interrupted_quantizer_or_a_bad_result_writes_nothing(tmp_path, monkeypatch):
    model, data = pruned_digits()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out.onnx").write_bytes(b"earlier")
    import onnxruntime.quantization as ort_quantization

    def failing(*args, **kwargs):
        raise RuntimeError("Unable to find data for node X\nmore detail")

    monkeypatch.setattr(ort_quantization, "quantize_static", failing)
    with pytest.raises(PangkasError, match="quantizer failed: Unable to find data for node X$"):
        pangkas.export_onnx(model, tmp_path / "out.onnx", data[0], quantize="int8-static", data=data, overwrite=True)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ort_quantization, "quantize_static", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pangkas.export_onnx(model, tmp_path / "out.onnx", data[0], quantize="int8-static", data=data, overwrite=True)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    compared = export_module._compared
    monkeypatch.setattr(export_module, "_compared", lambda *a: (3.0, 0.5))
    with pytest.raises(PangkasError, match=r"differ from the model's \(mean cosine 0.5000, max difference 3\); "):
        pangkas.export_onnx(model, tmp_path / "out.onnx", data[0], quantize="int8-static", data=data, overwrite=True)
    calls = []  # the float export passes, the int8 file computes something else than quantization explains

    def second_wrong(*args):
        calls.append(1)
        return (3.0, 0.89) if len(calls) > 1 else compared(*args)

    monkeypatch.setattr(export_module, "_compared", second_wrong)
    with pytest.raises(PangkasError, match="int8 moved them that far"):
        pangkas.export_onnx(model, tmp_path / "out.onnx", data[0], quantize="int8-static", data=data, overwrite=True)
    assert len(calls) == 2
    assert [(p.name, p.read_bytes()) for p in tmp_path.iterdir()] == [("out.onnx", b"earlier")]


def test_nodes_are_named_by_weight_then_by_scope_then_by_their_own_name():
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "stem.weight"], ["y"], name="n0"),
         onnx.helper.make_node("MatMul", ["y", "val_3"], ["z"], name="n1"),
         onnx.helper.make_node("MatMul", ["z", "z"], ["w"], name="n2"),
         onnx.helper.make_node("Relu", ["w"], ["v"], name="n3")],
        "g", [], [], initializer=[numpy_helper.from_array(torch.zeros(1).numpy(), n) for n in ("stem.weight", "val_3")])
    scope = graph.node[1].metadata_props.add()
    scope.key, scope.value = "pkg.torch.onnx.name_scopes", "['', 'blocks', 'blocks.0.fc', 'linear']"
    broken = graph.node[2].metadata_props.add()
    broken.key, broken.value = "pkg.torch.onnx.name_scopes", "['unterminated"
    assert onnx_quant.node_modules(onnx.helper.make_model(graph)) == {"n0": "stem", "n1": "blocks.0.fc", "n2": "n2"}


def test_a_model_in_training_mode_is_exported_as_evaluated_and_left_training(tmp_path):
    model, data = pruned_digits()
    model.train()
    result = pangkas.export_onnx(model, tmp_path / "t.onnx", data[0], quantize="int8-static", data=data)
    assert result.cosine > 0.99 and model.training and all(m.training for m in model.modules())
    assert pangkas.export_onnx(model, tmp_path / "f.onnx", data[0]).cosine > 0.9999 and model.training


class WithSpare(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 6)
        self.spare = nn.Linear(6, 6)  # never called: not in the graph, nothing to keep in float

    def forward(self, x):
        return self.body(x).relu()


def test_an_excluded_layer_the_graph_does_not_name_is_refused_not_quantized(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = WithSpare().eval()
    data = [torch.randn(8, 6) for _ in range(2)]
    result = pangkas.export_onnx(model, tmp_path / "a.onnx", data[0], quantize="int8-static", data=data,
                                 exclude="spare")
    assert result.quantization.layers == {"body": "int8"}  # the unused layer is no obstacle
    monkeypatch.setattr(onnx_quant, "node_modules", lambda proto: {n.name: n.name for n in proto.graph.node
                                                                   if n.op_type in onnx_quant.COMPUTE})
    with pytest.raises(PangkasError, match="could not find the ONNX node of body"):
        pangkas.export_onnx(model, tmp_path / "b.onnx", data[0], quantize="int8-static", data=data, exclude="body")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx"]


def test_a_hugging_face_model_with_dict_inputs_is_named_layer_by_layer(tmp_path, caplog, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)  # onnxruntime's shape inference gives up on BERT and leaves files in the cwd
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 100, (4, 12), generator=g), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
            for _ in range(3)]
    float_file = pangkas.export_onnx(model, tmp_path / "f.onnx", data[0])
    assert float_file.cosine > 0.9999
    longer = {"input_ids": torch.randint(0, 100, (3, 20), generator=g), "attention_mask": torch.ones(3, 20, dtype=torch.long)}
    longer["attention_mask"][0, 14:] = 0  # padded: another batch size and sequence length than the export's
    with torch.no_grad():
        torch.testing.assert_close(OnnxRuntimeModule(float_file.path.read_bytes())(**longer),
                                   model(**longer).last_hidden_state, atol=1e-4, rtol=1e-4)
    with caplog.at_level(logging.INFO):
        result = pangkas.export_onnx(model, tmp_path / "q.onnx", data[0], quantize="int8-static", data=data,
                                     exclude="encoder.layer.1.output")
        assert logging.getLogger().level == logging.INFO  # put back
    # onnxruntime's quantizer and the exporter's optimiser log notes on BERT: kept quiet
    notes = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.split(".")[0] in ("root", "onnxscript")]
    assert not notes
    linear = _layers(model, nn.Linear)
    layers = result.quantization.layers
    assert linear <= set(layers)  # every Linear found under its own name (the rest: attention's matmuls)
    assert layers["encoder.layer.1.output.dense"] == "excluded"
    assert {n for n in linear if layers[n] == "int8"} == linear - {"encoder.layer.1.output.dense"}
    assert result.cosine > 0.99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.onnx", "q.onnx"]  # nothing else written here


def test_int8_dynamic_quantizes_linear_layers_without_calibration_and_reports_convolutions(tmp_path):
    torch.manual_seed(0)
    model = TwoInputs().eval()
    batch = {"tokens": torch.randn(4, 5, 8), "scale": torch.rand(4, 5, 1) + 0.5}
    result = pangkas.export_onnx(model, tmp_path / "d.onnx", batch, quantize="int8-dynamic")
    assert result.quantization.layers == dict.fromkeys(("encoder.0", "encoder.2", "head"), "int8")
    assert result.quantization.fidelity != result.quantization.fidelity and result.cosine > 0.99  # nan: no data
    graph = onnx.load(str(tmp_path / "d.onnx")).graph
    assert "DynamicQuantizeLinear" in {n.op_type for n in graph.node}
    assert not any(n.op_type in onnx_quant.COMPUTE for n in graph.node)  # every MatMul/Gemm replaced
    longer = {"tokens": torch.randn(2, 5, 8), "scale": torch.rand(2, 5, 1) + 0.5}  # float inputs: dim 0 varies
    with torch.no_grad():
        got, exact = OnnxRuntimeModule((tmp_path / "d.onnx").read_bytes())(**longer), model(**longer)
    assert nn.functional.cosine_similarity(got.flatten(1), exact.flatten(1)).min() > 0.98
    cnn, data = pruned_digits()
    result = pangkas.export_onnx(cnn, tmp_path / "c.onnx", data[0], quantize="int8-dynamic", data=data)
    layers = result.quantization.layers
    assert {n for n, how in layers.items() if how == "int8"} == _layers(cnn, nn.Linear)
    assert all("use int8-static" in layers[n] for n in _layers(cnn, nn.Conv2d))
    assert result.quantization.fidelity > 0.99


def test_the_onnxruntime_module_takes_inputs_by_name_in_any_order_or_by_position(tmp_path):
    torch.manual_seed(0)
    model = TwoInputs().eval()
    batch = {"tokens": torch.randn(3, 5, 8), "scale": torch.rand(3, 5, 1)}
    runtime = OnnxRuntimeModule(onnx_quant.without_metadata(export_module._exported(model, batch)).SerializeToString())
    with torch.no_grad():
        expected = model(**batch)
    for got in (runtime(scale=batch["scale"], tokens=batch["tokens"]), runtime(batch["tokens"], batch["scale"]),
                runtime(batch["tokens"], scale=batch["scale"])):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(PangkasError, match="takes 2 inputs"):
        runtime(batch["tokens"], batch["scale"], batch["scale"])


def test_an_int8_file_within_quantization_error_is_written_with_its_cosine(tmp_path, monkeypatch):
    model, data = pruned_digits()
    compared, calls = export_module._compared, []

    def int8_error(*args):  # the float export exact, the int8 file off by what int8 can cost a transformer
        calls.append(1)
        return (0.4, 0.95) if len(calls) > 1 else compared(*args)

    monkeypatch.setattr(export_module, "_compared", int8_error)
    result = pangkas.export_onnx(model, tmp_path / "q.onnx", data[0], quantize="int8-static", data=data)
    assert result.cosine == 0.95 and "mean cosine 0.950000" in str(result) and (tmp_path / "q.onnx").exists()
