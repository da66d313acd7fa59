"""Fault injection, CLI: every verb against every bad input gives one line on stderr, the right
exit status, no traceback, and leaves every file as it was."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import pangkas
from pangkas.cli import main
from pangkas.demo import digits_cnn

DIGITS = ["pangkas.demo:digits_cnn", "--input-shape", "1,1,8,8"]
SAVED = {"source": "pangkas.demo:digits_cnn", "input_shape": "[1, 1, 8, 8]"}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding a user's files: a saved model, calibration data, a folder."""
    monkeypatch.chdir(tmp_path)
    pangkas.save(digits_cnn(), "model.safetensors", metadata=SAVED)
    safetensors.torch.save_file({"x": torch.randn(8, 1, 8, 8)}, "calib.safetensors")
    Path("existing.safetensors").write_bytes(b"the user's own file")
    Path("folder").mkdir()
    Path("folder/notes.txt").write_text("keep me")
    Path("garbage.safetensors").write_bytes(os.urandom(300))
    Path("binary.txt").write_bytes(b"\xff\xfe\x00\x9c" * 50)
    Path("empty.txt").write_text("\n\n")
    safetensors.torch.save_file({"x": torch.tensor(1.0)}, "scalar.safetensors")
    for name, metadata in {"badshape.safetensors": {**SAVED, "input_shape": "[1, \"a\"]"},
                           "notjson.safetensors": {**SAVED, "input_shape": "{{"},
                           "negative.safetensors": {**SAVED, "input_shape": "[1, -1, 8, 8]"},
                           "untrusted.safetensors": {**SAVED, "source": "json:loads"},
                           "recursive.safetensors": {**SAVED, "source": "model.safetensors"},
                           "nosource.safetensors": {}}.items():
        pangkas.save(digits_cnn(), name, metadata=metadata)
    full = Path("model.safetensors").read_bytes()
    Path("truncated.safetensors").write_bytes(full[: len(full) // 2])
    torch.save(digits_cnn(), "pickled.pt")
    return tmp_path


def out(name="out.safetensors"):
    return ["-o", name]


W = ["prune", "weights"]
C = ["prune", "channels"]
L = ["prune", "layers"]

# (argv, exit status, a fragment the one error line must contain)
BAD = [
    # argument parsing and option values
    (["measure"], 2, "MODEL"),
    (["nonsense"], 2, "invalid choice"),
    (["measure", *DIGITS[:1], "--input-shape", "1,x,8"], 2, "input-shape"),
    (["measure", *DIGITS[:1], "--input-shape", "0,1,8,8"], 2, "positive"),
    ([*W, *DIGITS, "--sparsity", "1.5", *out()], 2, "sparsity"),
    ([*W, *DIGITS, "--sparsity", "nan", *out()], 2, "sparsity"),
    ([*W, *DIGITS, "--threshold", "-1", *out()], 2, "threshold"),
    ([*W, *DIGITS, "--pattern", "4:2", *out()], 2, "N:M"),
    ([*W, *DIGITS, "--sparsity", "0.5", "--include", "nope", *out()], 2, "nope"),
    ([*C, *DIGITS, "--ratio", "-0.1", *out()], 2, "ratio"),
    ([*C, *DIGITS, *out()], 2, "--ratio"),
    ([*C, *DIGITS, "--heads", "0.5", *out()], 2, "Hugging Face"),
    ([*C, *DIGITS, "--ratio", "0.5", "--importance", "wanda", *out()], 2, "--data"),
    ([*C, *DIGITS, "--ratio", "0.5", "--batch-size", "0", *out()], 2, "batch-size"),
    ([*L, *DIGITS, "--n", "0", *out()], 2, "--n"),
    ([*L, *DIGITS, "--n", "99", "--data", "calib.safetensors", *out()], 2, "only"),
    # a wrong input shape that parses
    (["measure", *DIGITS[:1], "--input-shape", "1,3"], 2, "input-shape"),
    ([*C, *DIGITS[:1], "--input-shape", "2,5,8,8", "--ratio", "0.5", *out()], 2, "input-shape"),
    # MODEL specs
    (["measure", "no_such_thing"], 2, "cannot tell"),
    (["measure", "nosuchpackage.mod:fn"], 2, "cannot import"),
    (["measure", "json:"], 2, "json"),
    (["measure", "math:pi"], 2, "not a factory"),
    (["measure", "json:dumps"], 2, "json:dumps"),
    (["measure", "torchvision:not_a_model"], 2, "no model"),
    (["measure", "missing.safetensors"], 2, "no such file"),
    (["measure", "garbage.safetensors"], 2, "garbage.safetensors"),
    (["measure", "truncated.safetensors"], 2, "truncated.safetensors"),
    (["measure", "nosource.safetensors"], 2, "does not record"),
    (["measure", "recursive.safetensors"], 2, "another file"),
    (["measure", "untrusted.safetensors"], 2, "'json'"),
    (["measure", "badshape.safetensors"], 2, "input_shape"),
    (["measure", "notjson.safetensors"], 2, "input_shape"),
    (["measure", "negative.safetensors"], 2, "input_shape"),
    (["measure", "pickled.pt", "--input-shape", "1,1,8,8"], 2, "--allow-pickle"),
    (["measure", "model.safetensors", "--weights", "model.safetensors"], 2, "--weights"),
    (["measure", *DIGITS, "--weights", "garbage.safetensors"], 2, "garbage.safetensors"),
    (["measure", "folder"], 2, "config.json"),
    # user text that looks like rich markup is printed as it is
    (["measure", "[bold]x[/bold].safetensors"], 2, "[bold]x[/bold].safetensors"),
    (["measure", "[/x].safetensors"], 2, "[/x].safetensors"),
    # calibration data
    ([*L, *DIGITS, "--n", "1", "--data", "garbage.safetensors", *out()], 2, "garbage.safetensors"),
    ([*L, *DIGITS, "--n", "1", "--data", "scalar.safetensors", *out()], 2, "first dim"),
    ([*L, *DIGITS, "--n", "1", "--data", "nope.safetensors", *out()], 2, "no such data"),
    ([*L, *DIGITS, "--n", "1", "--data", "binary.txt", *out()], 2, "Hugging Face"),
    ([*L, *DIGITS, "--n", "1", "--data", "model.safetensors", *out()], 2, "first dim"),
    ([*C, *DIGITS, "--ratio", "0.5", "--importance", "wanda", "--data", "garbage.safetensors", *out()], 2,
     "garbage.safetensors"),
    # outputs
    ([*W, *DIGITS, "--sparsity", "0.5", "-o", "x.pt"], 2, ".safetensors"),
    ([*W, *DIGITS, "--sparsity", "0.5", "-o", "existing.safetensors"], 2, "--overwrite"),
    ([*W, "model.safetensors", "--sparsity", "0.5", "-o", "model.safetensors"], 2, "--overwrite-input"),
    ([*W, *DIGITS, "--sparsity", "0.5", "-o", "existing.safetensors/x.safetensors"], 2, "not a directory"),
    ([*C, *DIGITS, "--ratio", "0.5", "-o", "folder"], 2, ".safetensors"),
    (["demo", "--quick", "--out", "folder"], 2, "--overwrite"),
    (["demo", "--quick", "--out", "existing.safetensors"], 2, "not a directory"),
]


@pytest.mark.parametrize("argv,status,fragment", BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_input_is_one_line_and_changes_nothing(workdir, capsys, argv, status, fragment):
    before = snapshot(workdir)
    code = main(list(argv))
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == status, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0]
    assert "Traceback" not in err
    assert snapshot(workdir) == before


def test_hugging_face_directory_outputs(workdir, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64)
    transformers.BertModel(config).save_pretrained("bert")
    (workdir / "bert" / "user-notes.txt").write_text("mine")
    before = snapshot(workdir)
    capsys.readouterr()  # transformers' own progress bars
    heads = [*C, "bert", "--heads", "0.5", "--input-shape", "1,8"]
    for argv, fragment in [([*heads, "-o", "."], "contains the input"),
                           ([*heads, "-o", str(workdir)], "contains the input"),
                           ([*heads, "-o", "bert"], "--overwrite-input"),
                           ([*heads, "-o", "bert/inner"], "inside"),
                           ([*heads, "-o", "folder"], "--overwrite"),
                           ([*heads, "-o", "existing.safetensors"], "already exists"),
                           ([*heads, "--allow-approximate", "-o", "new"], "--allow-approximate"),
                           ([*W, "bert", "--sparsity", "0.5", "--scope", "global", "-o", "dir"], "--scope global"),
                           ([*W, "bert", "--sparsity", "0.5", "--max-memory", "1KB", "-o", "dir"], "max_memory"),
                           ([*L, "bert", "--n", "1", "--data", "empty.txt", "-o", "b.safetensors"], "no lines"),
                           ([*L, "bert", "--n", "1", "--data", "binary.txt", "-o", "b.safetensors"], "UTF-8")]:
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and fragment in err[0], (argv, err)
        assert snapshot(workdir) == before, argv


def test_an_operation_that_fails_is_exit_status_1(workdir, capsys, monkeypatch):
    import pangkas.weights.prune as prune

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(prune, "_apply", broken)
    argv = [*W, *DIGITS, "--sparsity", "0.5", *out()]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: RuntimeError: disk on fire second line (--debug shows the traceback)"]
    assert main([*argv, "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "disk on fire" in err.splitlines()[-1]
    assert not Path("out.safetensors").exists()


def test_a_cut_that_does_not_verify_is_exit_status_1(workdir, capsys, monkeypatch):
    import pangkas.layers as layers

    shapes = iter([[(1, 10)], [(1, 9)]])  # as if the model's output changed without the block
    monkeypatch.setattr(layers, "_output_shapes", lambda *args: next(shapes))
    assert main([*L, *DIGITS, "--n", "1", "--data", "calib.safetensors", *out()]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "changes the output shapes" in err[0] and "model is unchanged" in err[0]
    assert not Path("out.safetensors").exists()


def test_write_failure_is_exit_status_1_and_leaves_nothing(workdir, capsys, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    before = snapshot(workdir)
    assert main([*W, *DIGITS, "--sparsity", "0.5", *out()]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "No space left on device" in err[0]
    assert snapshot(workdir) == before  # no partial file, no temporary left behind


def test_interrupt_is_one_line(workdir, capsys, monkeypatch):
    import pangkas.channels as channels

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(channels, "prune_channels", interrupt)
    before = snapshot(workdir)
    assert main([*C, *DIGITS, "--ratio", "0.5", *out()]) == 130
    assert capsys.readouterr().err.splitlines() == ["error: interrupted"]
    assert snapshot(workdir) == before


def test_names_that_look_like_markup_are_shown_as_they_are(workdir, capsys):
    name = "[bold]m[/x].safetensors"
    pangkas.save(digits_cnn(), name, metadata=SAVED)
    assert main(["measure", name, "--no-latency"]) == 0
    assert name in capsys.readouterr().out
    assert main([*W, name, "--sparsity", "0.5", "-o", "[red]out[/].safetensors"]) == 0
    assert "wrote [red]out[/].safetensors" in capsys.readouterr().out
    assert Path("[red]out[/].safetensors").is_file()


def test_debug_before_or_after_the_command(workdir, capsys):
    for argv in (["--debug", "measure", "json:dumps"], ["measure", "json:dumps", "--debug"]):
        assert main(argv) == 2
        assert "Traceback" in capsys.readouterr().err


def test_the_installed_command_never_prints_a_traceback(workdir):
    script = Path(sys.executable).parent / "pangkas"
    result = subprocess.run([str(script), "measure", "untrusted.safetensors"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: ") and "--trust-source" in result.stderr


def test_a_file_never_makes_the_cli_import_its_module(workdir):
    """A module named by a file is imported only with --trust-source, and `python -m` does not
    look for it in the working directory even then; torchvision:NAME is not shadowed either."""
    for name in ("planted", "torchvision"):
        (workdir / f"{name}.py").write_text(
            "import pathlib; pathlib.Path('IMPORTED').write_text(__name__)\n"
            "def build():\n    import torch\n    return torch.nn.Linear(2, 2)\n")
    pangkas.save(torch.nn.Linear(2, 2), "planted.safetensors",
                 metadata={"source": "planted:build", "input_shape": "[1, 2]"})
    cli = [sys.executable, "-m", "pangkas.cli", "measure", "--no-latency"]
    refused = subprocess.run([*cli, "planted.safetensors"], capture_output=True, text=True)
    assert refused.returncode == 2 and "'planted'" in refused.stderr and "--trust-source" in refused.stderr
    trusted = subprocess.run([*cli, "planted.safetensors", "--trust-source"], capture_output=True, text=True)
    assert trusted.returncode == 2 and "cannot import 'planted:build'" in trusted.stderr
    pangkas.save(torch.nn.Linear(2, 2), "vision.safetensors",
                 metadata={"source": "torchvision:resnet18", "input_shape": "[1, 3, 32, 32]"})
    shadowed = subprocess.run([*cli, "vision.safetensors"], capture_output=True, text=True)
    assert shadowed.returncode == 2 and "does not fit ResNet" in shadowed.stderr  # the real torchvision
    assert not (workdir / "IMPORTED").exists()


def test_trusted_source_is_imported(workdir, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(workdir))
    (workdir / "mymodels.py").write_text("import torch\ndef build():\n    return torch.nn.Linear(3, 2)\n")
    pangkas.save(torch.nn.Linear(3, 2), "mine.safetensors", metadata={"source": "mymodels:build",
                                                                       "input_shape": "[1, 3]"})
    assert main(["measure", "mine.safetensors", "--no-latency"]) == 2
    assert "'mymodels'" in capsys.readouterr().err and "mymodels" not in sys.modules
    assert main(["measure", "mine.safetensors", "--no-latency", "--trust-source"]) == 0
    assert "mymodels" in sys.modules
    sys.modules.pop("mymodels")
