import re

import pytest
import torch

import pangkas
from pangkas.cli import main
from pangkas.demo import SPARSITIES, accuracy, digits_cnn, load_digits_split, run_demo
from pangkas.export import OnnxRuntimeModule


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, quick=True)


def test_digits_split_is_fixed_real_data():
    a, b = load_digits_split(), load_digits_split()
    assert a.x_train.shape == (1347, 1, 8, 8) and a.x_test.shape == (450, 1, 8, 8)
    assert torch.equal(a.y_test, b.y_test)
    assert 0 <= a.x_train.min() and a.x_train.max() <= 1
    assert set(a.y_test.tolist()) == set(range(10))


def test_demo_stages(quick_demo):
    out, stages = quick_demo
    assert [s.name for s in stages][0] == "dense"
    tuned = [s for s in stages if s.name.startswith("weights")]
    thin = next(s for s in stages if s.name == "channels 50%")
    cut = next(s for s in stages if s.name == "pruned channels 50% no finetune")
    assert cut.accuracy > 0.8 * stages[0].accuracy  # the re-fit keeps it working before any recovery
    assert thin.params < 0.3 * stages[0].params and thin.macs < 0.3 * stages[0].macs
    assert thin.latency_ratio > 0
    shallow = next(s for s in stages if s.name == "layers -1")
    assert shallow.params < stages[0].params and shallow.macs < stages[0].macs and shallow.latency_ratio > 0
    raw, everything, runtime, int8 = stages[-4:]
    assert everything.kind == "pipeline" and everything.macs < thin.macs and everything.sparsity > 0.4
    assert everything.accuracy > raw.accuracy  # recovery by distillation helped
    assert int8.kind == "int8" and int8.macs == everything.macs and int8.latency_ratio > 0
    assert abs(int8.accuracy - everything.accuracy) <= 0.02  # int8 costs little (quick demo: 3 epochs)
    assert int8.file_bytes < 0.4 * everything.file_bytes  # pangkas.save: sparse int8 vs sparse fp32
    assert int8.file_bytes < stages[0].file_bytes / 18 and re.fullmatch(r"\.onnx \d+\.\d KiB", int8.file_note)
    assert runtime.kind == "onnxruntime" and runtime.accuracy == pytest.approx(everything.accuracy, abs=0.003)
    assert int8.file_bytes < 0.5 * runtime.file_bytes
    assert [s.name for s in tuned] == [f"weights {p:.0%}" for p in SPARSITIES]
    assert stages[0].accuracy > 0.5  # learnt something even in 3 quick epochs
    sparsities = [stages[0].sparsity] + [s.sparsity for s in tuned]
    sizes = [stages[0].file_bytes] + [s.file_bytes for s in tuned]
    assert sparsities == sorted(sparsities) and sizes == sorted(sizes, reverse=True)
    assert tuned[-1].sparsity > 0.93
    assert tuned[-1].file_bytes < 0.15 * stages[0].file_bytes
    assert all(s.latency_ratio > 0 for s in [stages[0], *tuned])


def test_demo_outputs_reload_with_the_reported_accuracy(quick_demo):
    out, stages = quick_demo
    data = load_digits_split()
    by_name = {s.name: s for s in stages}
    model = pangkas.load(out / "digits_cnn_pruned.safetensors", digits_cnn())
    assert accuracy(model, data.x_test, data.y_test) == pytest.approx(by_name["weights 95%"].accuracy)
    shallow = pangkas.load(out / "digits_cnn_layers.safetensors", digits_cnn())
    assert len(shallow) == len(digits_cnn()) - 1
    assert accuracy(shallow, data.x_test, data.y_test) == pytest.approx(by_name["layers -1"].accuracy)
    thin = pangkas.load(out / "digits_cnn_channels.safetensors", digits_cnn())
    assert thin[0][0].out_channels == 16
    assert accuracy(thin, data.x_test, data.y_test) == pytest.approx(by_name["channels 50%"].accuracy)
    table = (out / "results.md").read_text()
    assert all(s.name in table for s in stages)
    assert "| latency vs dense (95% interval) |" in table
    rows = {line.split(" | ")[0].strip("| "): line.rstrip(" |").split(" | ")[-1] for line in table.splitlines()
            if line.startswith("| ")}
    assert rows["dense"] == "1.00x (baseline)"
    for s in stages[1:]:
        if s.latency is not None:  # deployed: a ratio with its interval, or no claim at all
            assert s.latency.rounds == 6 and 0 < s.latency.low <= s.latency.value <= s.latency.high
            assert rows[s.name] == str(s.latency)
            assert re.fullmatch(r"no measurable difference|\d+\.\d\dx \(\d+\.\d\d-\d+\.\d\d\)", rows[s.name])
    for picture in ("weights.png", "pipeline.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pipeline = pangkas.load(out / "digits_cnn_pipeline.safetensors", digits_cnn())
    recovered = by_name["pipeline: layers, channels, weights"]
    assert accuracy(pipeline, data.x_test, data.y_test) == pytest.approx(recovered.accuracy)
    runtime = OnnxRuntimeModule((out / "digits_cnn_pipeline_int8.onnx").read_bytes())
    assert accuracy(runtime, data.x_test, data.y_test) == pytest.approx(stages[-1].accuracy)
    int8 = pangkas.load(out / "digits_cnn_pipeline_int8.safetensors", digits_cnn())  # the same int8 graph
    assert accuracy(int8, data.x_test, data.y_test) == pytest.approx(stages[-1].accuracy, abs=0.005)


def test_cli_demo_quick(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("the user's")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2  # refused before training
    assert "--overwrite" in capsys.readouterr().err and sorted(tmp_path.iterdir()) == [tmp_path / "notes.txt"]
    assert main(["demo", "--quick", "--out", str(tmp_path), "--overwrite"]) == 0
    assert (tmp_path / "notes.txt").read_text() == "the user's"  # only the demo's own files are written
    out = capsys.readouterr().out
    assert "weights 95%" in out and (tmp_path / "weights.png").is_file()
    code = main(["measure", str(tmp_path / "digits_cnn_pruned.safetensors"), "--no-latency"])
    nonzero_row = next(l for l in capsys.readouterr().out.splitlines() if "non-zero parameters" in l)
    assert code == 0 and "5.46k" in nonzero_row  # 94.5% of the 99.37k parameters are zero
