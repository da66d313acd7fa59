"""Recovery by distillation: it recovers, keeps masks, checkpoints, resumes, runs distributed."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import pangkas
from pangkas.weights.masks import get_mask


def mlp():
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))


def batches(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 8, generator=g) for _ in range(n)]


def kl_to(teacher, student, data):
    with torch.no_grad():
        return float(sum(pangkas.recover.__globals__["kd_loss"](student(x), teacher(x), 1.0) for x in data))


def pruned_pair():
    torch.manual_seed(0)
    teacher = mlp().eval()
    student = copy.deepcopy(teacher)
    pangkas.prune_weights(student, sparsity=0.8)
    return teacher, student


def test_distillation_brings_the_student_back_towards_the_teacher():
    teacher, student = pruned_pair()
    data = batches()
    before = kl_to(teacher, student, data)
    report = pangkas.recover(student, data, teacher=teacher, epochs=5, lr=1e-2)
    assert kl_to(teacher, student, data) < 0.5 * before
    assert report.epoch_losses[-1] < report.epoch_losses[0] and report.steps == 40


def test_masks_stay_enforced():
    teacher, student = pruned_pair()
    pruned = (student[0].weight == 0).clone()
    pangkas.recover(student, batches(), teacher=teacher, epochs=2, lr=1e-2)
    assert (student[0].weight[pruned] == 0).all() and get_mask(student[0]) is not None


def test_channel_pruned_student_with_task_loss_and_features():
    teacher, _ = pruned_pair()
    student = copy.deepcopy(teacher)
    x = batches()[0]
    pangkas.prune_channels(student, x, ratio=0.5)
    targets = [(b, teacher(b).argmax(1)) for b in batches()]
    task = lambda out, batch: nn.functional.cross_entropy(out, batch[1])  # noqa: E731
    report = pangkas.recover(student, targets, teacher=teacher, task_loss=task, alpha=0.5, epochs=3,
                             lr=1e-2, features={"2": "2"}, inputs=lambda batch: batch[0])
    assert report.steps == 24 and report.epoch_losses[-1] < report.epoch_losses[0]


def test_checkpoints_resume_where_they_stopped(tmp_path):
    teacher, first = pruned_pair()
    second = copy.deepcopy(first)
    data = batches()
    pangkas.recover(first, data, teacher=teacher, epochs=2, lr=1e-2)  # uninterrupted
    pangkas.recover(second, data, teacher=teacher, epochs=1, lr=1e-2, checkpoint=tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    (tmp_path / "ckpt").rename(tmp_path / "ckpt.old")  # as if killed between the swap's two renames
    fresh = copy.deepcopy(teacher)
    pangkas.prune_weights(fresh, sparsity=0.8)  # a new process would rebuild the pruned student
    report = pangkas.recover(fresh, data, teacher=teacher, epochs=2, lr=1e-2, checkpoint=tmp_path / "ckpt")
    assert report.resumed_from == 8 and report.steps == 16 and len(report.epoch_losses) == 1
    for key, value in first.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value)
    assert not list(tmp_path.glob(".ckpt*")) and not (tmp_path / "ckpt.old").exists()


def test_nan_loss_stops_and_restores_the_last_checkpoint(tmp_path):
    teacher, student = pruned_pair()
    data = batches()
    pangkas.recover(student, data, teacher=teacher, epochs=1, lr=1e-2, checkpoint=tmp_path / "ckpt")
    good = copy.deepcopy(student.state_dict())
    calls = {"n": 0}

    def exploding(output, batch):
        calls["n"] += 1
        return output.sum() * (float("nan") if calls["n"] == 3 else 0.0)

    with pytest.raises(pangkas.PangkasError, match="nan.*stopped"):
        pangkas.recover(student, data, teacher=teacher, task_loss=exploding, alpha=0.5, epochs=2,
                        lr=1e-2, checkpoint=tmp_path / "ckpt")
    for key, value in student.state_dict().items():
        assert torch.equal(value, good[key]), key  # back at the last good checkpoint


@pytest.mark.parametrize("kwargs,message", [
    (dict(loss="kd"), "teacher"),
    (dict(loss="task"), "task_loss"),
    (dict(loss="hinge"), "loss must be"),
    (dict(epochs=0), "epochs"),
    (dict(lr=-1.0), "lr"),
    (dict(alpha=2.0), "alpha"),
])
def test_bad_arguments(kwargs, message):
    teacher, student = pruned_pair()
    kwargs = {"teacher": teacher, **kwargs} if "loss" not in kwargs else kwargs
    with pytest.raises(pangkas.PangkasError, match=message):
        pangkas.recover(student, batches(), **kwargs)


def test_mismatched_teacher_and_data_are_clear_errors():
    teacher, student = pruned_pair()
    wider = nn.Sequential(nn.Linear(8, 5))
    with pytest.raises(pangkas.PangkasError, match="does not match"):
        pangkas.recover(student, batches(), teacher=wider)
    with pytest.raises(pangkas.PangkasError, match="does not run on a batch"):
        pangkas.recover(student, [torch.randn(4, 3)], teacher=teacher)
    with pytest.raises(pangkas.PangkasError, match="iterable of batches"):
        pangkas.recover(student, torch.randn(4, 8), teacher=teacher)


def test_two_processes_end_with_identical_weights(tmp_path):
    script = Path(__file__).parent / "helpers" / "ddp_recover.py"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
         str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    _, reference = pruned_pair()
    assert not torch.equal(ranks[0]["0.weight"], reference.state_dict()["0.weight"])  # it trained
