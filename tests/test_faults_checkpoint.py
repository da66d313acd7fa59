"""Checkpoints of ``recover`` under faults: a crash at any point of a save, folders pangkas did not
write, and checkpoints that do not fit the run."""

import copy
import json
import os
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import pangkas
from pangkas import checkpoint as checkpoint_module
from pangkas.files import STAGING

MARKER, OLD = checkpoint_module.MARKER, checkpoint_module.OLD
CHECKPOINT = sorted([MARKER, "model.safetensors", "trainer.safetensors"])
STEPS_PER_EPOCH = 4


def make_teacher_and_data():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    g = torch.Generator().manual_seed(1)
    return teacher, [torch.randn(8, 8, generator=g) for _ in range(STEPS_PER_EPOCH)]


def pruned(teacher):
    student = copy.deepcopy(teacher)
    pangkas.prune_weights(student, sparsity=0.5)
    return student


def run(teacher, data, student=None, **options):
    student = pruned(teacher) if student is None else student
    return student, pangkas.recover(student, data, teacher=teacher, lr=1e-2, **options)


def tensors(model):
    """Every parameter and buffer (masks included) as stored."""
    return {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}


def weights(model):
    """What the model computes with (a masked weight's pruned entries read as zero)."""
    return {name: t.clone() for name, t in model.state_dict().items()}


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def step_of(directory):
    with safetensors.safe_open(str(directory / "trainer.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["trainer"])["step"]


@pytest.fixture(scope="module")
def two_epochs():
    """The weights of an uninterrupted two-epoch run, which every resumed run must reach."""
    teacher, data = make_teacher_and_data()
    student, _ = run(teacher, data, epochs=2)
    return weights(student)


# -- a crash anywhere in a save ------------------------------------------------------------------

class Crash(BaseException):
    """The process died: raised at the crash point, and by every file-system change after it."""


# crash point -> whether the new checkpoint is already in place there
POINTS = {
    "staging folder created": False,
    "model written, trainer not": False,
    "before the first rename": False,
    "between the renames": False,
    "after the second rename": True,
    "old checkpoint half removed": True,
    "old checkpoint emptied, not removed": True,
}


def fail_at(patch, point, directory, error):
    """Make the next save fail at ``point`` by raising ``error``. A ``Crash`` also makes every
    file-system change after it fail, as if the process were gone: no cleanup code can run."""
    directory = Path(os.path.realpath(directory))  # as recover sees it
    dead, fired, unlinks, staged = [], [], [], []
    old_name = f".{directory.name}{OLD}"

    def die():
        if fired:  # once: the cleanup after an ordinary error may retry the same step
            return
        fired.append(True)
        if error is Crash:
            dead.append(True)
        raise error(f"simulated failure: {point}")

    def guarded(real, check):
        def call(*args, **kwargs):
            if dead:
                raise Crash("the process is gone")
            if check is not None:
                check(*args)
            return real(*args, **kwargs)
        return call

    def rename(src, dst):
        if (point == "before the first rename" and Path(src) == directory
                or point == "between the renames" and Path(dst) == directory):
            die()

    def unlink(path):
        if Path(path).parent.name == old_name:
            unlinks.append(path)
            if len(unlinks) == {"after the second rename": 1, "old checkpoint half removed": 2}.get(point):
                die()
        if point == "leftover staging folder half removed" and Path(path).parent.name.startswith(
                f".{directory.name}{STAGING}"):
            staged.append(path)
            if len(staged) == 2:
                die()

    def rmdir(path):
        if point == "old checkpoint emptied, not removed" and Path(path).name == old_name:
            die()

    for name, check in [("rename", rename), ("unlink", unlink), ("remove", unlink), ("rmdir", rmdir),
                        ("replace", None), ("link", None), ("mkdir", None)]:
        patch.setattr(os, name, guarded(getattr(os, name), check))
    mkdtemp, save = tempfile.mkdtemp, checkpoint_module.save

    def crashing_mkdtemp(*args, **kwargs):
        made = mkdtemp(*args, **kwargs)
        if point == "staging folder created" and Path(made).name.startswith(f".{directory.name}{STAGING}"):
            die()
        return made

    def crashing_save(*args, **kwargs):
        written = save(*args, **kwargs)
        if point == "model written, trainer not":
            die()
        return written

    patch.setattr(tempfile, "mkdtemp", crashing_mkdtemp)
    patch.setattr(checkpoint_module, "save", crashing_save)


@pytest.mark.parametrize("point", POINTS)
def test_after_a_crash_anywhere_in_a_save_the_next_run_resumes_and_tidies_up(tmp_path, monkeypatch, point,
                                                                              two_epochs):
    teacher, data = make_teacher_and_data()
    directory = tmp_path / "ckpt"
    run(teacher, data, epochs=1, checkpoint=directory)
    with monkeypatch.context() as patch:
        fail_at(patch, point, directory, Crash)
        with pytest.raises(Crash):
            run(teacher, data, epochs=2, checkpoint=directory)  # dies saving epoch 2
    assert sorted(p.name for p in tmp_path.iterdir()) != ["ckpt"] or sorted(os.listdir(directory)) != CHECKPOINT

    student, report = run(teacher, data, epochs=2, checkpoint=directory)  # a new process
    newest = 2 * STEPS_PER_EPOCH if POINTS[point] else STEPS_PER_EPOCH
    assert report.resumed_from == newest and report.steps == 2 * STEPS_PER_EPOCH
    assert_identical(weights(student), two_epochs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(os.listdir(directory)) == CHECKPOINT and step_of(directory) == 2 * STEPS_PER_EPOCH


@pytest.mark.parametrize("point", POINTS)
def test_a_save_that_fails_tidies_up_at_once_and_says_where_the_student_is(tmp_path, monkeypatch, point):
    teacher, data = make_teacher_and_data()
    directory = tmp_path / "ckpt"
    run(teacher, data, epochs=1, checkpoint=directory)
    student = pruned(teacher)
    with monkeypatch.context() as patch:
        fail_at(patch, point, directory, OSError)
        with pytest.raises(OSError) as failure:
            run(teacher, data, student, epochs=2, checkpoint=directory)
    newest = 2 * STEPS_PER_EPOCH if POINTS[point] else STEPS_PER_EPOCH
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(os.listdir(directory)) == CHECKPOINT and step_of(directory) == newest
    assert f"checkpoint of step {newest}" in "".join(getattr(failure.value, "__notes__", []))
    at_checkpoint = pruned(teacher)
    pangkas.load(directory / "model.safetensors", at_checkpoint)
    assert_identical(weights(student), weights(at_checkpoint))


def test_a_crash_while_removing_a_leftover_is_repaired_by_the_next_run(tmp_path, monkeypatch, two_epochs):
    teacher, data = make_teacher_and_data()
    directory = tmp_path / "ckpt"
    run(teacher, data, epochs=1, checkpoint=directory)
    for point in ("model written, trainer not", "leftover staging folder half removed"):
        with monkeypatch.context() as patch:
            fail_at(patch, point, directory, Crash)
            with pytest.raises(Crash):
                run(teacher, data, epochs=2, checkpoint=directory)
    leftover, = (p for p in tmp_path.iterdir() if p.name != "ckpt")
    assert os.listdir(leftover) == [MARKER]  # still recognisable: the marker goes last
    student, report = run(teacher, data, epochs=2, checkpoint=directory)
    assert report.resumed_from == STEPS_PER_EPOCH and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert_identical(weights(student), two_epochs)


# -- folders pangkas did not write ---------------------------------------------------------------

def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("layout,message", [
    ({"ckpt/notes.txt": b"mine"}, "notes.txt"),
    ({"ckpt/model.safetensors": b"my own model"}, "not a pangkas checkpoint"),
    ({"ckpt": b"a file"}, "is a file"),
    ({f".ckpt{OLD}/notes.txt": b"mine"}, "not written by pangkas"),
])
def test_a_checkpoint_path_holding_what_pangkas_did_not_write_is_refused_untouched(tmp_path, layout, message):
    for name, content in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    before = _tree(tmp_path)
    teacher, data = make_teacher_and_data()
    student = pruned(teacher)
    untrained = tensors(student)
    with pytest.raises(pangkas.PangkasError, match=message):
        run(teacher, data, student, epochs=1, checkpoint=tmp_path / "ckpt")
    assert _tree(tmp_path) == before
    assert_identical(tensors(student), untrained)


def test_an_empty_directory_is_used(tmp_path):
    (tmp_path / "ckpt").mkdir()
    teacher, data = make_teacher_and_data()
    run(teacher, data, epochs=1, checkpoint=tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == CHECKPOINT and step_of(tmp_path / "ckpt") == STEPS_PER_EPOCH


def test_look_alikes_of_pangkas_leftovers_are_left_alone(tmp_path):
    """Only folders with pangkas's marker (or empty ones under its staging name) are removed."""
    for name in ["ckpt.old/notes.txt", f".ckpt{STAGING}mine/notes.txt", f".ckpt{STAGING}file"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"mine")
    before = _tree(tmp_path)
    teacher, data = make_teacher_and_data()
    run(teacher, data, epochs=1, checkpoint=tmp_path / "ckpt")
    run(teacher, data, epochs=2, checkpoint=tmp_path / "ckpt")  # replaces its own checkpoint
    after = _tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("ckpt/") and k != "ckpt"} == before
    assert step_of(tmp_path / "ckpt") == 2 * STEPS_PER_EPOCH


def test_a_file_put_into_the_checkpoint_during_training_is_never_swapped_away(tmp_path):
    teacher, data = make_teacher_and_data()
    directory = tmp_path / "ckpt"
    run(teacher, data, epochs=1, checkpoint=directory)
    calls = []

    def drop_a_file(output, batch):
        calls.append(1)
        if len(calls) == 2:
            (directory / "notes.txt").write_text("mine")
        return output.sum() * 0

    student = pruned(teacher)
    with pytest.raises(pangkas.PangkasError, match="notes.txt.*not a pangkas checkpoint"):
        run(teacher, data, student, epochs=2, checkpoint=directory, loss_fn=drop_a_file, alpha=0.5)
    assert (directory / "notes.txt").read_text() == "mine"
    assert step_of(directory) == STEPS_PER_EPOCH and not (tmp_path / f".ckpt{OLD}").exists()


# -- checkpoints that do not fit the run ---------------------------------------------------------

def _sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def _frozen_bias(student):
    student[2].bias.requires_grad_(False)
    return student


def _wider(_):
    student = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    pangkas.prune_weights(student, sparsity=0.5)
    return student


def _as_an_older_pangkas_wrote_it(directory):
    """Drop what this version adds: the marker, and the optimizer's name and shapes."""
    path = directory / "trainer.safetensors"
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["trainer"])
    stored = safetensors.torch.load_file(str(path))
    del meta["optimizer"], meta["shapes"]
    path.unlink()
    safetensors.torch.save_file(stored, str(path), metadata={"trainer": json.dumps(meta)})
    (directory / MARKER).unlink()


@pytest.mark.parametrize("change,message", [
    (dict(optimizer=_sgd), "written with Adam, this run uses SGD"),
    (dict(student=_frozen_bias), r"state for \[4\] trainable tensors.*this run has \[3\]"),
    (dict(student=_wider), r"0.bias is \(16,\) there, \(32,\) here"),
    (dict(optimizer=_sgd, older=True), "optimizer settings"),
])
def test_a_checkpoint_that_does_not_fit_the_run_is_refused_before_the_student_changes(tmp_path, change, message):
    teacher, data = make_teacher_and_data()
    directory = tmp_path / "ckpt"
    run(teacher, data, epochs=1, checkpoint=directory)
    if change.get("older"):
        _as_an_older_pangkas_wrote_it(directory)
    checkpoint = _tree(tmp_path)
    student = change.get("student", lambda s: s)(pruned(teacher))
    before = tensors(student)
    options = {"optimizer": change["optimizer"]} if "optimizer" in change else {}
    with pytest.raises(pangkas.PangkasError, match=message):
        run(teacher, data, student, epochs=2, checkpoint=directory, **options)
    assert_identical(tensors(student), before)
    assert _tree(tmp_path) == checkpoint
