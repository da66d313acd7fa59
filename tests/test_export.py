"""pangkas.export_onnx: pruned and int8 models as ONNX files onnxruntime runs with the same outputs,
checked before anything is written."""

import importlib

import onnx
from onnx import numpy_helper
import onnxruntime
import pytest
import torch
from torch import nn

import pangkas
from conftest import pruned_digits
from pangkas import PangkasError

export_module = importlib.import_module("pangkas.export")


def _run(path, x):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def test_a_pruned_model_exports_and_runs_in_onnxruntime_at_any_batch_size(tmp_path):
    model, data = pruned_digits()
    report = pangkas.export_onnx(model, tmp_path / "small.onnx", data[0])
    assert report.max_difference < 1e-4 and report.cosine > 0.9999
    assert report.bytes == (tmp_path / "small.onnx").stat().st_size
    x = torch.rand(5, 1, 8, 8)  # not the batch size it was exported with
    with torch.no_grad():
        torch.testing.assert_close(_run(tmp_path / "small.onnx", x), model(x), atol=1e-4, rtol=1e-4)


pytest.importorskip("torchao")


def test_an_int8_static_model_exports_as_int8_onnx(tmp_path):
    model, data = pruned_digits()
    quantized, _ = pangkas.quantize(model, data, "int8-static")
    pangkas.export_onnx(model, tmp_path / "float.onnx", data[0])
    report = pangkas.export_onnx(quantized, tmp_path / "int8.onnx", data[0])
    ops = {node.op_type for node in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = {name: sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(tmp_path / name)).graph.initializer)
               for name in ("float.onnx", "int8.onnx")}
    assert weights["int8.onnx"] < 0.3 * weights["float.onnx"]  # stored as int8, not quantized at run time
    x = torch.rand(7, 1, 8, 8)
    with torch.no_grad():
        got, exact = _run(tmp_path / "int8.onnx", x), model(x)
    assert nn.functional.cosine_similarity(got, exact).min() > 0.98  # within the quantization error
    assert report.cosine > 0.99 and not quantized.training


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x  # data-dependent: not exportable


def test_bad_input_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    model, data = pruned_digits()
    with pytest.raises(PangkasError, match=".onnx"):
        pangkas.export_onnx(model, tmp_path / "small.bin", data[0])
    (tmp_path / "taken.onnx").write_bytes(b"mine")
    with pytest.raises(PangkasError, match="overwrite"):
        pangkas.export_onnx(model, tmp_path / "taken.onnx", data[0])
    assert (tmp_path / "taken.onnx").read_bytes() == b"mine"
    with pytest.raises(PangkasError, match="torch.onnx.export could not export Branchy"):
        pangkas.export_onnx(Branchy().eval(), tmp_path / "branchy.onnx", torch.randn(2, 4))
    monkeypatch.setattr(export_module, "_compared", lambda *a: (3.0, 0.5))
    with pytest.raises(PangkasError, match="differ from the model's"):
        pangkas.export_onnx(model, tmp_path / "wrong.onnx", data[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.onnx"]
