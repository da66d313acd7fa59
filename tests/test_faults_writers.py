"""Fault injection, writers: targets that hold user files, the input, and crashes mid-write.
pangkas never deletes or overwrites what it did not write, and a write appears whole or not at all."""

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import pangkas
from pangkas import files


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(root.rglob("*"))}


def model():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


# -- pangkas.save ---------------------------------------------------------------------------

def test_save_never_replaces_an_existing_file_unasked(tmp_path):
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"someone else's")
    with pytest.raises(pangkas.PangkasError, match="already exists.*overwrite=True"):
        pangkas.save(model(), target)
    assert target.read_bytes() == b"someone else's"
    pangkas.save(model(), target, overwrite=True)
    assert pangkas.load(target, model()) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_save_refuses_a_directory_and_its_own_input(tmp_path):
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(pangkas.PangkasError, match="is a directory"):
        pangkas.save(model(), tmp_path / "d.safetensors", overwrite=True)
    path = pangkas.save(model(), tmp_path / "m.safetensors")
    loaded = pangkas.load(path, model())
    before = path.read_bytes()
    for kwargs in ({}, {"overwrite": True}):  # --overwrite is not --overwrite-input
        with pytest.raises(pangkas.PangkasError, match="overwrite_input=True"):
            pangkas.save(loaded, path, **kwargs)
    assert path.read_bytes() == before
    nn.init.zeros_(loaded[0].weight)
    pangkas.save(loaded, path, overwrite_input=True)
    assert path.read_bytes() != before


@pytest.mark.parametrize("crash", ["write", "fsync", "link"])
def test_a_crash_while_saving_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, crash):
    target = tmp_path / "m.safetensors"
    pangkas.save(model(), target)
    before = snapshot(tmp_path)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    where = {"write": (files.Path, "write_bytes"), "fsync": (files.os, "fsync"), "link": (files.os, "replace")}[crash]
    monkeypatch.setattr(*where, boom)
    with pytest.raises(KeyboardInterrupt):
        pangkas.save(model(), target, overwrite=True)
    assert snapshot(tmp_path) == before


def test_a_file_appearing_during_the_save_is_not_clobbered(tmp_path, monkeypatch):
    target = tmp_path / "m.safetensors"
    real_fsync = os.fsync

    def racing_fsync(fd):  # another program writes the target while pangkas is writing
        real_fsync(fd)
        target.write_bytes(b"arrived first")

    monkeypatch.setattr(files.os, "fsync", racing_fsync)
    with pytest.raises(pangkas.PangkasError, match="already exists"):
        pangkas.save(model(), target)
    assert target.read_bytes() == b"arrived first"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# -- directories ----------------------------------------------------------------------------

def test_staged_directory_merges_into_a_user_directory_only_when_asked(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "mine.txt").write_text("user")
    (out / "config.json").write_text("old")
    (out / "sub" / "theirs.txt").write_text("user")
    before = snapshot(tmp_path)
    with pytest.raises(pangkas.PangkasError, match="not empty"):
        with files.staged_directory(out) as staging:
            pass
    assert snapshot(tmp_path) == before
    with files.staged_directory(out, overwrite=True) as staging:
        (staging / "config.json").write_text("new")
        (staging / "sub").mkdir()
        (staging / "sub" / "ours.txt").write_text("pangkas")
    assert (out / "config.json").read_text() == "new" and (out / "mine.txt").read_text() == "user"
    assert (out / "sub" / "theirs.txt").read_text() == "user" and (out / "sub" / "ours.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left


def test_a_failure_inside_a_staged_directory_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with files.staged_directory(tmp_path / "new") as staging:
            (staging / "half.bin").write_bytes(b"x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_directory_in_the_way_of_a_file_stops_before_anything_moves(tmp_path):
    out = tmp_path / "out"
    (out / "config.json").mkdir(parents=True)  # a user's directory where pangkas writes a file
    (out / "a.txt").write_text("user")
    before = snapshot(tmp_path)
    with pytest.raises(pangkas.PangkasError, match="in the way"):
        with files.staged_directory(out, overwrite=True) as staging:
            (staging / "a.txt").write_text("pangkas")
            (staging / "config.json").write_text("{}")
    assert snapshot(tmp_path) == before


# -- pangkas.save_pretrained ----------------------------------------------------------------

@pytest.fixture
def bert(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64)
    directory = tmp_path / "work" / "bert"
    transformers.BertModel(config).save_pretrained(directory)
    (directory / "tokenizer_config.json").write_text("{}")
    return transformers.BertModel.from_pretrained(directory), directory


def test_save_pretrained_keeps_user_files(bert, tmp_path):
    model, _ = bert
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "config.json").write_text("{}")
    before = snapshot(tmp_path)
    with pytest.raises(pangkas.PangkasError, match="not empty"):
        pangkas.save_pretrained(model, out)
    assert snapshot(tmp_path) == before
    pangkas.save_pretrained(model, out, overwrite=True)
    assert (out / "README.md").read_text() == "my notes"
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 32  # ours replaced theirs
    type(model).from_pretrained(out)


def test_save_pretrained_never_writes_over_or_around_its_input(bert, tmp_path):
    model, directory = bert
    (directory / "user.txt").write_text("mine")
    before = snapshot(tmp_path)
    for target, kwargs, message in [
        (directory, {}, "overwrite_input=True"),                       # loaded from there
        (directory, {"overwrite": True}, "overwrite_input=True"),
        (directory.parent, {"overwrite": True}, "contains the input"),  # `-o <parent of the input>`
        (tmp_path, {"overwrite": True, "overwrite_input": True}, "contains the input"),
    ]:
        with pytest.raises(pangkas.PangkasError, match=message):
            pangkas.save_pretrained(model, target, **kwargs)
        assert snapshot(tmp_path) == before, target
    with pytest.raises(pangkas.PangkasError, match="copied into it"):
        pangkas.save_pretrained(model, directory / "pruned", files_from=directory)
    assert snapshot(tmp_path) == before
    pangkas.save_pretrained(model, directory, files_from=directory, overwrite_input=True)
    assert (directory / "user.txt").read_text() == "mine" and (directory / "tokenizer_config.json").is_file()
    type(model).from_pretrained(directory)


def test_a_crash_in_save_pretrained_leaves_no_trace(bert, tmp_path, monkeypatch):
    from pangkas.integrations import hf_directory

    model, _ = bert
    before = snapshot(tmp_path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_directory, "_write_config", crash)
    with pytest.raises(KeyboardInterrupt):
        pangkas.save_pretrained(model, tmp_path / "out")
    assert snapshot(tmp_path) == before


# -- the demo -------------------------------------------------------------------------------

def test_demo_refuses_a_user_directory_before_training(tmp_path, monkeypatch):
    import pangkas.demo as demo

    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.setattr(demo, "train", lambda *a, **k: pytest.fail("trained before checking --out"))
    with pytest.raises(pangkas.PangkasError, match="not empty"):
        demo.run_demo(tmp_path, quick=True)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_sensitivity_plot_never_replaces_a_file_unasked(tmp_path):
    result = pangkas.sensitivity(model(), lambda m: float(m(torch.ones(1, 4)).sum()),
                                 example_inputs=torch.randn(2, 4), ratios=(0.5,))
    picture = tmp_path / "s.png"
    picture.write_bytes(b"a user's picture")
    with pytest.raises(pangkas.PangkasError, match="already exists"):
        result.plot(picture)
    assert picture.read_bytes() == b"a user's picture"
    assert result.plot(picture, overwrite=True).read_bytes()[:4] == b"\x89PNG"
