import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pangkas
from pangkas.cli import main
from pangkas.demo import digits_cnn

DIGITS = ["pangkas.demo:digits_cnn", "--input-shape", "1,1,8,8"]


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def weight_sparsity(model):
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_measure_factory(capsys):
    code, out, _ = run(capsys, "measure", *DIGITS, "--no-latency")
    params = sum(p.numel() for p in digits_cnn().parameters())
    assert code == 0
    assert f"{params / 1e3:.2f}k" in out and "MACs" in out


def test_prune_weights_writes_a_loadable_file_and_measures_it(capsys, tmp_path):
    out_file = tmp_path / "pruned.safetensors"
    code, out, _ = run(capsys, "prune", "weights", *DIGITS, "--sparsity", "0.9", "--scope", "global",
                       "-o", str(out_file))
    assert code == 0 and out_file.is_file()
    assert "after/before" in out and "0.9" in out
    model = pangkas.load(out_file, digits_cnn())
    assert weight_sparsity(model) == pytest.approx(0.9, abs=1e-4)
    # the saved file is itself a MODEL: rebuilt from the source and input shape it records
    code, out, _ = run(capsys, "measure", str(out_file), "--no-latency")
    assert code == 0 and "file (pangkas.save)" in out
    # and pruning it further, to a new file, composes
    again = tmp_path / "again.safetensors"
    code, _, _ = run(capsys, "prune", "weights", str(out_file), "--pattern", "1:4", "-o", str(again))
    assert code == 0
    assert weight_sparsity(pangkas.load(again, digits_cnn())) > 0.9


def test_refuses_to_overwrite_input(capsys, tmp_path):
    path = pangkas.save(digits_cnn(), tmp_path / "m.safetensors",
                        metadata={"source": "pangkas.demo:digits_cnn", "input_shape": "[1, 1, 8, 8]"})
    before = path.read_bytes()
    code, _, err = run(capsys, "prune", "weights", str(path), "--sparsity", "0.5", "-o", str(path))
    assert code == 2 and "--overwrite-input" in err
    assert path.read_bytes() == before
    code, _, _ = run(capsys, "prune", "weights", str(path), "--sparsity", "0.5", "-o", str(path),
                     "--overwrite-input")
    assert code == 0 and path.read_bytes() != before


def test_weights_option_loads_into_factory(capsys, tmp_path):
    model = digits_cnn()
    pangkas.prune_weights(model, sparsity=0.8)
    weights = pangkas.save(model, tmp_path / "w.safetensors")
    code, out, _ = run(capsys, "measure", *DIGITS, "--weights", str(weights), "--no-latency")
    params = sum(p.numel() for p in digits_cnn().parameters())
    assert code == 0
    nonzero = next(line for line in out.splitlines() if "non-zero" in line)
    assert f"{params / 1e3:.2f}k" not in nonzero  # the pruned weights were loaded


def test_pickles_only_with_allow_pickle(capsys, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(digits_cnn(), path)
    code, _, err = run(capsys, "measure", str(path), "--input-shape", "1,1,8,8", "--no-latency")
    assert code == 2 and "--allow-pickle" in err
    code, out, _ = run(capsys, "measure", str(path), "--input-shape", "1,1,8,8", "--no-latency",
                       "--allow-pickle")
    assert code == 0 and "parameters" in out


def test_torchvision_model(capsys):
    code, out, _ = run(capsys, "measure", "torchvision:resnet18", "--no-latency")
    assert code == 0 and "11.69M" in out and "1.81G" in out


def test_hugging_face_directory(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    code, out, _ = run(capsys, "measure", str(tmp_path / "bert"), "--input-shape", "1,16", "--no-latency")
    assert code == 0 and "parameters" in out
    code, out, err = run(capsys, "prune", "weights", str(tmp_path / "bert"), "--sparsity", "0.5", "-o",
                         str(tmp_path / "d"))  # streamed, block by block, into a directory
    assert code == 0, err
    assert "pooler.dense" in out and (tmp_path / "d" / "model.safetensors.index.json").is_file()
    out_file = tmp_path / "bert.safetensors"
    code, _, _ = run(capsys, "prune", "weights", str(tmp_path / "bert"), "--sparsity", "0.5",
                     "--include", "encoder", "-o", str(out_file))
    assert code == 0
    code, out, _ = run(capsys, "measure", str(out_file), "--no-latency")
    assert code == 0


@pytest.mark.parametrize("args,message", [
    (["prune", "weights", *DIGITS, "--sparsity", "1.5", "-o", "x.safetensors"], "sparsity"),
    (["prune", "weights", *DIGITS, "--pattern", "4:2", "-o", "x.safetensors"], "N:M"),
    (["prune", "weights", *DIGITS, "--sparsity", "0.5", "--include", "nope", "-o", "x.safetensors"], "nope"),
    (["prune", "weights", *DIGITS, "--sparsity", "0.5", "-o", "x.pt"], ".safetensors"),
    (["measure", "no_such_thing"], "cannot tell"),
    (["measure", "torchvision:not_a_model"], "no model"),
    (["measure", "nosuchpackage.mod:fn"], "cannot import"),
])
def test_bad_input_is_a_clear_error(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *args)
    assert code == 2 and message in err
    assert not list(tmp_path.iterdir())


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "pangkas"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("demo", "measure", "prune"):
        assert command in result.stdout


def test_prune_channels_writes_a_smaller_model(capsys, tmp_path):
    out_file = tmp_path / "thin.safetensors"
    code, out, _ = run(capsys, "prune", "channels", *DIGITS, "--ratio", "0.5", "-o", str(out_file))
    assert code == 0 and "MACs" in out and "groups pruned" in out
    model = pangkas.load(out_file, digits_cnn())  # a fresh instance takes the pruned shapes
    assert model[0][0].out_channels == 16 and model[7].out_features == 64
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    code, out, _ = run(capsys, "measure", str(out_file), "--no-latency")
    params = sum(p.numel() for p in model.parameters())
    assert code == 0 and f"{params / 1e3:.2f}k" in out


def test_prune_channels_bad_ratio(capsys, tmp_path):
    code, _, err = run(capsys, "prune", "channels", *DIGITS, "--ratio", "1.2", "-o", str(tmp_path / "x.safetensors"))
    assert code == 2 and "ratio" in err and not list(tmp_path.iterdir())


def test_prune_layers_with_data_file(capsys, tmp_path):
    import safetensors.torch

    data = tmp_path / "calib.safetensors"
    safetensors.torch.save_file({"x": torch.randn(24, 1, 8, 8)}, str(data))
    out_file = tmp_path / "shallow.safetensors"
    code, out, _ = run(capsys, "prune", "layers", *DIGITS, "--n", "1", "--data", str(data), "-o", str(out_file))
    assert code == 0 and "remove" in out and "MACs" in out
    model = pangkas.load(out_file, digits_cnn())  # the removed block is removed again on load
    assert len(model) == len(digits_cnn()) - 1
    code, out, _ = run(capsys, "measure", str(out_file), "--no-latency")
    assert code == 0


def test_prune_layers_text_data_for_hugging_face(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3,
                                     num_attention_heads=2, intermediate_size=64)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    vocab = tmp_path / "bert" / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]))
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(tmp_path / "bert")
    texts = tmp_path / "texts.txt"
    texts.write_text("w1 w2 w3\nw4 w5\nw6 w7 w8 w9\n")
    code, out, err = run(capsys, "prune", "layers", str(tmp_path / "bert"), "--ratio", "0.34",
                         "--data", str(texts), "-o", str(tmp_path / "b.safetensors"))
    assert code == 0, err
    assert "removes 1 of 3 blocks" in out  # whole layers (not their attention sublayers)


@pytest.mark.parametrize("extra,message", [(["--n", "9"], "only"), (["--n", "1", "--data", "nope.bin"], "no such data")])
def test_prune_layers_bad_input(capsys, tmp_path, extra, message):
    code, _, err = run(capsys, "prune", "layers", *DIGITS, *extra, "-o", str(tmp_path / "x.safetensors"))
    assert code == 2 and message in err


def test_prune_hugging_face_heads_writes_a_from_pretrained_directory(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    (tmp_path / "llama" / "tokenizer_config.json").write_text("{}")
    out_dir = tmp_path / "pruned"
    code, out, err = run(capsys, "prune", "channels", str(tmp_path / "llama"), "--heads", "0.5", "--ffn", "0.5",
                         "--input-shape", "1,12", "-o", str(out_dir))
    assert code == 0, err
    assert (out_dir / "tokenizer_config.json").is_file()  # other files come along
    again = transformers.AutoModelForCausalLM.from_pretrained(out_dir)
    assert again.config.num_attention_heads == 2 and again.config.intermediate_size == 32
    assert again.model.layers[0].self_attn.q_proj.weight.shape == (16, 32)


def test_prune_hugging_face_heads_its_config_cannot_describe(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    code, out, err = run(capsys, "prune", "channels", str(tmp_path / "bert"), "--heads", "0.5",
                         "--input-shape", "1,12", "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert "trust_remote_code=True" in out and (tmp_path / "out" / "modeling_pangkas.py").is_file()  # BERT derives head_dim: code comes along
    again = transformers.AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert again.encoder.layer[0].attention.self.query.weight.shape == (16, 32)
    code, out, err = run(capsys, "measure", str(tmp_path / "out"), "--input-shape", "1,12", "--no-latency")
    assert code == 0, err
    assert f"{sum(p.numel() for p in again.parameters()) / 1000:.2f}k" in out


def test_prune_channels_with_wanda_needs_data(capsys, tmp_path):
    import safetensors.torch

    code, _, err = run(capsys, "prune", "channels", *DIGITS, "--ratio", "0.5", "--importance", "wanda",
                       "-o", str(tmp_path / "x.safetensors"))
    assert code == 2 and "--data" in err
    data = tmp_path / "calib.safetensors"
    safetensors.torch.save_file({"x": torch.randn(16, 1, 8, 8)}, str(data))
    code, out, _ = run(capsys, "prune", "channels", *DIGITS, "--ratio", "0.5", "--importance", "wanda",
                       "--data", str(data), "-o", str(tmp_path / "x.safetensors"))
    assert code == 0 and "importance=wanda" in out


def test_compress_writes_the_model_its_report_and_its_plot(capsys, tmp_path):
    import json

    data = tmp_path / "calib.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.rand(64, 1, 8, 8)}, str(data))
    out_file = tmp_path / "small.safetensors"
    code, out, err = run(capsys, "compress", *DIGITS, "--macs", "0.5", "--data", str(data), "--batch-size", "16",
                         "--no-reconstruct", "-o", str(out_file))
    assert code == 0, err
    assert "chosen:" in out and "finalist" in out
    model = pangkas.load(out_file, digits_cnn())  # reshaped and depth-cut as the file records
    x = torch.rand(1, 1, 8, 8)
    assert pangkas.measure(model, x, latency=False).macs <= 0.5 * pangkas.measure(digits_cnn(), x, latency=False).macs
    report = json.loads((tmp_path / "small.compress.json").read_text())
    assert report["met"] and report["chosen"]["figures"]["macs"] <= 0.5
    assert (tmp_path / "small.pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_compress_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path):
    out_file = tmp_path / "small.safetensors"
    code, _, err = run(capsys, "compress", *DIGITS, "--macs", "0.00001", "-o", str(out_file))
    assert code == 2 and err.count("\n") == 1 and "cannot be met" in err and "reaches macs=" in err
    code, _, err = run(capsys, "compress", *DIGITS, "-o", str(out_file))
    assert code == 2 and "give a budget" in err
    code, _, err = run(capsys, "compress", *DIGITS, "--latency", "-1", "-o", str(out_file))
    assert code == 2 and "positive number" in err
    code, _, err = run(capsys, "compress", *DIGITS, "--macs", "0.5", "--recover-rounds", "2", "-o", str(out_file))
    assert code == 2 and err.count("\n") == 1 and "give --recover-steps" in err
    (tmp_path / "small.pareto.png").write_bytes(b"mine")  # not pangkas's: refused before any work
    code, _, err = run(capsys, "compress", *DIGITS, "--macs", "0.5", "-o", str(out_file))
    assert code == 2 and "small.pareto.png" in err and "--overwrite" in err
    assert (tmp_path / "small.pareto.png").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.pareto.png"]


def test_compress_a_hugging_face_directory(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(config)
    dense.save_pretrained(tmp_path / "llama")
    (tmp_path / "llama" / "tokenizer_config.json").write_text("{}")
    out_dir = tmp_path / "small"
    code, out, err = run(capsys, "compress", str(tmp_path / "llama"), "--params", "0.8", "--input-shape", "2,12",
                         "--no-reconstruct", "-o", str(out_dir))
    assert code == 0, err
    assert (out_dir / "tokenizer_config.json").is_file() and (tmp_path / "small.pareto.png").is_file()
    code_file = (out_dir / "modeling_pangkas.py").exists()
    again = transformers.AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=code_file)
    assert sum(p.numel() for p in again.parameters()) <= 0.8 * sum(p.numel() for p in dense.parameters())


def test_quantize_writes_an_int8_onnx_file_onnxruntime_runs(capsys, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from safetensors.torch import save_file

    data = tmp_path / "calib.safetensors"
    save_file({"x": torch.rand(32, 1, 8, 8)}, str(data))
    out_file = tmp_path / "small.onnx"
    code, out, err = run(capsys, "quantize", *DIGITS, "--scheme", "int8-static", "--data", str(data), "-o",
                         str(out_file), "--exclude", "10")
    assert code == 0, err
    assert "5 of 6 layers quantized" in out and "10 (excluded)" in out and "onnxruntime vs the model" in out
    session = onnxruntime.InferenceSession(str(out_file), providers=["CPUExecutionProvider"])
    assert session.run(None, {session.get_inputs()[0].name: torch.rand(3, 1, 8, 8).numpy()})[0].shape == (3, 10)
    code, out, err = run(capsys, "quantize", *DIGITS, "--scheme", "int8-dynamic", "-o", str(tmp_path / "d.onnx"))
    assert code == 0, err
    assert "2 of 6 layers quantized" in out and "use int8-static for convolutions" in out


def test_quantize_int8_static_writes_a_file_the_cli_loads_again(capsys, tmp_path):
    pytest.importorskip("torchao")
    from safetensors.torch import save_file

    data = tmp_path / "calib.safetensors"
    save_file({"x": torch.rand(32, 1, 8, 8)}, str(data))
    out_file = tmp_path / "small.safetensors"
    code, out, err = run(capsys, "quantize", *DIGITS, "--scheme", "int8-static", "--data", str(data), "-o",
                         str(out_file))
    assert code == 0, err
    code, out, err = run(capsys, "measure", str(out_file), "--no-latency")
    assert code == 0, err
    assert "MACs" in out


def test_quantize_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path):
    code, _, err = run(capsys, "quantize", *DIGITS, "--scheme", "int8-weight-only", "-o", str(tmp_path / "q.onnx"))
    assert code == 2 and err.count("\n") == 1 and "OUT.safetensors" in err
    code, _, err = run(capsys, "quantize", *DIGITS, "--scheme", "int4-weight-only", "-o", str(tmp_path / "q.bin"))
    assert code == 2 and err.count("\n") == 1 and ".safetensors or .onnx" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_a_refused_quantization_is_one_line_even_when_torchao_is_imported_fresh(tmp_path):
    """Importing torchao makes torch log deprecation lines; a fresh process shows whether they leak."""
    pytest.importorskip("torchao")
    result = subprocess.run([sys.executable, "-m", "pangkas.cli", "quantize", *DIGITS, "--scheme", "int4-weight-only",
                             "-o", str(tmp_path / "q.safetensors")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: int4-weight-only is unsupported") and not list(tmp_path.iterdir())


def test_compress_with_quantize_meets_a_file_budget_with_int8_weights(capsys, tmp_path):
    pytest.importorskip("torchao")
    from torchao.utils import TorchAOBaseTensor

    out_file = tmp_path / "small.safetensors"
    code, out, err = run(capsys, "compress", *DIGITS, "--file-size", "0.15", "--quantize", "int8-weight-only",
                         "--no-reconstruct", "-o", str(out_file))
    assert code == 0, err
    model = pangkas.load(out_file, digits_cnn())
    assert any(isinstance(m.weight, TorchAOBaseTensor) for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert out_file.stat().st_size <= 0.15 * len(pangkas.io.serialize(*pangkas.io.encode(digits_cnn())))
