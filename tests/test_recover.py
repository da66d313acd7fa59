"""Recovery by distillation: it recovers, keeps masks, checkpoints, resumes, runs distributed."""

import copy
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import pangkas
from pangkas.recover import kd_loss
from pangkas.weights.masks import get_mask


def mlp():
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))


def batches(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 8, generator=g) for _ in range(n)]


def kl_to(teacher, student, data):
    with torch.no_grad():
        return float(sum(kd_loss(student(x), teacher(x), 1.0) for x in data))


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


def test_channel_pruned_student_with_a_loss_fn_and_features():
    teacher, _ = pruned_pair()
    student = copy.deepcopy(teacher)
    x = batches()[0]
    pangkas.prune_channels(student, x, ratio=0.5)
    targets = [(b, teacher(b).argmax(1)) for b in batches()]
    task = lambda out, batch: nn.functional.cross_entropy(out, batch[1])  # noqa: E731
    report = pangkas.recover(student, targets, teacher=teacher, loss_fn=task, alpha=0.5, epochs=3,
                             lr=1e-2, features={"2": "2"}, inputs=lambda batch: batch[0])
    assert report.steps == 24 and report.epoch_losses[-1] < report.epoch_losses[0]


def test_checkpoints_resume_where_they_stopped(tmp_path):
    teacher, first = pruned_pair()
    second = copy.deepcopy(first)
    data = batches()
    pangkas.recover(first, data, teacher=teacher, epochs=2, lr=1e-2)  # uninterrupted
    pangkas.recover(second, data, teacher=teacher, epochs=1, lr=1e-2, checkpoint=tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.pangkas-old")  # as if killed between the swap's renames
    fresh = copy.deepcopy(teacher)
    pangkas.prune_weights(fresh, sparsity=0.8)  # a new process would rebuild the pruned student
    report = pangkas.recover(fresh, data, teacher=teacher, epochs=2, lr=1e-2, checkpoint=tmp_path / "ckpt")
    assert report.resumed_from == 8 and report.steps == 16 and len(report.epoch_losses) == 1
    for key, value in first.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_nan_loss_stops_and_restores_the_last_checkpoint(tmp_path):
    teacher, student = pruned_pair()
    data = batches()
    pangkas.recover(student, data, teacher=teacher, epochs=1, lr=1e-2, checkpoint=tmp_path / "ckpt")
    good = copy.deepcopy(student.state_dict())
    calls = {"n": 0}

    def exploding(output, batch):
        calls["n"] += 1
        return output.sum() * (float("nan") if calls["n"] == 3 else 0.0)

    with pytest.raises(pangkas.OperationFailed, match="nan at step 11 .*stopped and the student is back at "
                                                   "the checkpoint of step 8 in"):
        pangkas.recover(student, data, teacher=teacher, loss_fn=exploding, alpha=0.5, epochs=2,
                        lr=1e-2, checkpoint=tmp_path / "ckpt")
    for key, value in student.state_dict().items():
        assert torch.equal(value, good[key]), key  # back at the last good checkpoint


@pytest.mark.parametrize("kwargs,message", [
    (dict(objective="kd"), "teacher"),
    (dict(objective="task"), "loss_fn"),
    (dict(objective="hinge"), "objective must be"),
    (dict(epochs=0), "epochs"),
    (dict(lr=-1.0), "lr"),
    (dict(alpha=2.0), "alpha"),
])
def test_bad_arguments(kwargs, message):
    teacher, student = pruned_pair()
    kwargs = {"teacher": teacher, **kwargs} if "objective" not in kwargs else kwargs
    with pytest.raises(pangkas.PangkasError, match=message):
        pangkas.recover(student, batches(), **kwargs)


def test_the_old_names_loss_and_task_loss_warn_and_train_the_same():
    teacher, student = pruned_pair()
    data = [(b, teacher(b).argmax(1)) for b in batches()]
    task = lambda out, batch: nn.functional.cross_entropy(out, batch[1])  # noqa: E731
    common = dict(teacher=teacher, alpha=0.5, lr=1e-2, inputs=lambda batch: batch[0])
    new, old = copy.deepcopy(student), copy.deepcopy(student)
    expected = pangkas.recover(new, data, objective="mse", loss_fn=task, **common)
    with pytest.warns(DeprecationWarning) as caught:
        got = pangkas.recover(old, data, loss="mse", task_loss=task, **common)
    said = " ".join(str(w.message) for w in caught)
    assert "recover(loss=...) is now recover(objective=...)" in said
    assert "recover(task_loss=...) is now recover(loss_fn=...)" in said
    assert got.epoch_losses == expected.epoch_losses  # "mse" and the task term: not the defaults
    assert_identical(raw(old), raw(new))
    with pytest.raises(pangkas.PangkasError, match="both loss= and objective="):
        pangkas.recover(copy.deepcopy(student), data, loss="mse", objective="mse", **common)


def test_mismatched_teacher_and_data_are_clear_errors():
    teacher, student = pruned_pair()
    wider = nn.Sequential(nn.Linear(8, 5))
    with pytest.raises(pangkas.PangkasError, match="does not match"):
        pangkas.recover(student, batches(), teacher=wider)
    with pytest.raises(pangkas.PangkasError, match="does not run on a batch"):
        pangkas.recover(student, [torch.randn(4, 3)], teacher=teacher)
    with pytest.raises(pangkas.PangkasError, match="iterable of batches"):
        pangkas.recover(student, torch.randn(4, 8), teacher=teacher)


def raw(model):
    """Every parameter and buffer (masks, and the pruned entries under them, included)."""
    return {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_non_finite_loss_without_checkpoint_puts_the_student_back_as_it_was():
    teacher, student = pruned_pair()
    before = raw(student)
    calls = []

    def exploding(output, batch):
        calls.append(1)
        return output.sum() * 0.0 + (float("inf") if len(calls) == 3 else 0.0)

    with pytest.raises(pangkas.PangkasError, match="inf at step 3 .*the student is back at its state before recover"):
        pangkas.recover(student, batches(), teacher=teacher, loss_fn=exploding, alpha=0.5, lr=1e-2)
    assert len(calls) == 3  # two steps trained and were undone
    assert_identical(raw(student), before)


def test_an_error_midway_puts_the_student_back_and_says_so():
    teacher, student = pruned_pair()
    before = raw(student)
    calls = []

    def failing(output, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the labels ran out")
        return output.sum() * 0.0

    with pytest.raises(RuntimeError, match="labels ran out") as failure:
        pangkas.recover(student, batches(), teacher=teacher, loss_fn=failing, alpha=0.5, lr=1e-2)
    if sys.version_info >= (3, 11):
        assert "back at its state before recover" in failure.value.__notes__[0]
    assert_identical(raw(student), before)


# -- data ----------------------------------------------------------------------------------------

def test_a_generator_trains_one_epoch():
    teacher, student = pruned_pair()
    report = pangkas.recover(student, (b for b in batches()), teacher=teacher, lr=1e-2)
    assert report.steps == 8 and len(report.epoch_losses) == 1 and report.epoch_losses[0] > 0


def test_a_generator_for_several_epochs_is_refused_before_anything_changes():
    teacher, student = pruned_pair()
    before, data = raw(student), iter(batches())
    with pytest.raises(pangkas.PangkasError, match="one-shot iterator.*epochs=2"):
        pangkas.recover(student, data, teacher=teacher, epochs=2)
    assert_identical(raw(student), before)
    assert len(list(data)) == 8  # not a batch taken


def test_a_reiterable_without_len_trains_every_epoch_reading_each_batch_when_it_is_needed():
    teacher, student = pruned_pair()
    counts = {"read": 0, "trained": 0, "ahead": 0}

    class Stream:  # no __len__, and not a list
        def __iter__(self):
            for batch in batches():
                counts["read"] += 1
                counts["ahead"] = max(counts["ahead"], counts["read"] - counts["trained"])
                yield batch

    def count(output, batch):
        counts["trained"] += 1
        return output.sum() * 0.0

    report = pangkas.recover(student, Stream(), teacher=teacher, loss_fn=count, alpha=0.5, epochs=3, lr=1e-2)
    assert report.steps == 24 and len(report.epoch_losses) == 3 and min(report.epoch_losses) > 0
    assert counts["ahead"] == 1  # never held whole


def test_data_without_batches_is_an_error_not_a_zero_loss():
    teacher, student = pruned_pair()
    with pytest.raises(pangkas.PangkasError, match="data is empty"):
        pangkas.recover(student, [], teacher=teacher)
    passes = []

    class RunsDry:
        def __iter__(self):
            passes.append(1)
            return iter(batches() if len(passes) == 1 else [])

    before = raw(student)
    with pytest.raises(pangkas.PangkasError, match="epoch 2 got no batches.*back at its state before recover"):
        pangkas.recover(student, RunsDry(), teacher=teacher, epochs=2, lr=1e-2)
    assert_identical(raw(student), before)


# -- options -------------------------------------------------------------------------------------

def test_mse_distils_the_outputs():
    teacher, student = pruned_pair()
    data = batches()

    def mse():
        with torch.no_grad():
            return [float(nn.functional.mse_loss(student(x), teacher(x))) for x in data]

    first = mse()[0]
    report = pangkas.recover(student, data[:1], teacher=teacher, objective="mse", lr=1e-2)
    assert report.epoch_losses[0] == pytest.approx(first, rel=1e-6)  # the loss is the MSE
    before = sum(mse())
    pangkas.recover(student, data, teacher=teacher, objective="mse", epochs=5, lr=2e-2)
    assert sum(mse()) < 0.5 * before


def test_temperature_softens_the_kd_loss():
    teacher, student = pruned_pair()
    x, kd = batches()[0], kd_loss
    losses = {}
    for t in (1.0, 5.0):
        copied = copy.deepcopy(student)
        with torch.no_grad():
            expected = float(kd(copied(x), teacher(x), t))
        losses[t] = pangkas.recover(copied, [x], teacher=teacher, temperature=t, lr=1e-2).epoch_losses[0]
        assert losses[t] == pytest.approx(expected, rel=1e-6)
    assert losses[1.0] != pytest.approx(losses[5.0], rel=1e-2)


def test_feature_weight_scales_the_feature_term():
    teacher, student = pruned_pair()
    x, kd = batches()[0], kd_loss
    with torch.no_grad():
        distillation = float(kd(student(x), teacher(x), 2.0))
        feature = float(nn.functional.mse_loss(student[0](x), teacher[0](x)))
    assert feature > 1e-3
    trained = {}
    for weight in (0.0, 3.0):
        copied = copy.deepcopy(student)
        report = pangkas.recover(copied, [x] * 3, teacher=teacher, features={"0": "0"}, feature_weight=weight,
                                 epochs=1, lr=1e-2)
        trained[weight] = copied[0].weight.detach().clone()
        first = pangkas.recover(copy.deepcopy(student), [x], teacher=teacher, features={"0": "0"},
                                feature_weight=weight, lr=1e-2).epoch_losses[0]
        assert first == pytest.approx(distillation + weight * feature, rel=1e-5)
        assert report.steps == 3
    assert (trained[0.0] - trained[3.0]).abs().max() > 1e-4


def test_the_optimizer_factory_is_used():
    teacher, student = pruned_pair()
    before, made = raw(student), []

    def still(params):
        made.append(1)
        return torch.optim.SGD(params, lr=0.0)

    pangkas.recover(student, batches(), teacher=teacher, optimizer=still, epochs=2)
    assert len(made) == 1
    assert_identical(raw(student), before)
    pangkas.recover(student, batches(), teacher=teacher)  # the default, Adam, does move it
    assert not torch.equal(student[0].weight, before["0.parametrizations.weight.original"] * get_mask(student[0]))


def test_seed_makes_dropout_repeatable():
    teacher, _ = pruned_pair()

    def run(seed):
        student = copy.deepcopy(nn.Sequential(teacher[0], nn.Dropout(0.5), teacher[1], teacher[2]))
        torch.randn(7)  # whatever state the global generator is in
        pangkas.recover(student, batches(), teacher=teacher, seed=seed, lr=1e-2)
        return student.state_dict()

    first, again, other = run(1), run(1), run(2)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


# -- distributed ---------------------------------------------------------------------------------

def _helper(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "helpers" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script, *args, timeout: float) -> tuple[int, str]:
    """Run ``script`` on two CPU ranks; one that outlasts ``timeout`` (a hung collective) fails the test."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               str(script), *map(str, args)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()  # torchrun stops its workers on SIGTERM
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        pytest.fail(f"the ranks did not finish within {timeout} s (a collective hung):\n{output[-3000:]}")
    return process.returncode, output


def test_two_ranks_average_gradients_like_one_process_on_both_ranks_batches(tmp_path):
    """7 batches on 2 ranks: each takes 3 (its own), the 7th is dropped; DDP's averaged gradient
    equals the gradient on each round's two batches concatenated, so the ranks must end equal to
    each other and to one process trained on those concatenations."""
    helper = _helper("ddp_recover")
    code, output = _torchrun(helper.__file__, tmp_path, timeout=120)
    assert code == 0, output[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    reports = [outcome["reports"] for outcome in outcomes]
    per_epoch = helper.BATCHES // helper.RANKS
    for first, second in reports:
        assert first["steps"] == 2 * per_epoch and second["resumed_from"] == 2 * per_epoch
        assert second["steps"] == 3 * per_epoch
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    teacher, student, data = helper.build()
    untrained = student.state_dict()["0.weight"].clone()
    report = pangkas.recover(student, helper.rounds(data), teacher=teacher, epochs=helper.EPOCHS, lr=helper.LR)
    for key, value in student.state_dict().items():
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-6, atol=1e-12)
    per_rank = [first["losses"] + second["losses"] for first, second in reports]
    assert per_rank[0] != per_rank[1]  # the ranks saw different batches ...
    assert report.epoch_losses == pytest.approx([(a + b) / 2 for a, b in zip(*per_rank)], rel=1e-9)  # ... all six
    assert not torch.equal(ranks[0]["0.weight"], untrained)
    for outcome in outcomes:  # too few batches for the ranks: an error on every rank, not a hang
        assert "1 batches for 2 ranks" in outcome["refusals"][0]
        assert "epoch 1 got no batches from data (or fewer than 2, one per rank)" in outcome["refusals"][1]


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest elementwise difference over the largest magnitude: per tensor, so that entries
    near zero do not turn rounding into a large ratio."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def test_sharded_recovery_on_two_ranks_ends_where_one_process_does(tmp_path):
    """recover(shard=True) (FSDP2) on 2 CPU ranks: a tiny pruned LLaMA, 7 batches dealt out as DDP
    deals them. Each rank holds about half of every parameter and optimizer moment while training;
    every rank ends with the whole trained student, masks kept, within 1e-9 of one process trained
    on each round's batches concatenated; bad calls and a nan on one rank are refused on both."""
    pytest.importorskip("transformers")
    helper = _helper("fsdp_recover")
    code, output = _torchrun(helper.__file__, tmp_path, timeout=120)
    assert code == 0, output[-3000:]
    outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    local, whole = zip(*(outcome["train"]["params"] for outcome in outcomes))
    assert local[0] != local[1] and whole[0] == whole[1]  # the vocabulary (61 rows) splits 31 / 30
    for a, b, n in zip(local[0], local[1], whole[0]):
        assert a + b == n and 0.45 * n < a < 0.55 * n  # every parameter split in two, nothing held twice
    for outcome in outcomes:
        held, total = outcome["train"]["moments"]
        assert 0.45 * total < held < 0.55 * total  # optimizer state sharded too
        train = outcome["train"]
        assert train["steps"] == 3 * helper.EPOCHS and train["masks"] and train["pruned_zero"] and train["plain"]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    teacher, student, data = helper.build()
    untrained = copy.deepcopy(student.state_dict())
    report = pangkas.recover(student, helper.rounds(data), teacher=teacher, **helper.OPTIONS)
    worst = max(_relative_difference(ranks[0][key], value) for key, value in student.state_dict().items())
    assert worst < 1e-9, worst  # float64: ~1e-14 measured (the issue asks for 1e-5)
    moved = max(_relative_difference(ranks[0][key], value) for key, value in untrained.items())
    assert moved > 1e-3  # trained, so the comparison above can fail
    per_rank = [outcome["train"]["losses"] for outcome in outcomes]
    assert per_rank[0] != per_rank[1]  # the ranks saw different batches ...
    assert report.epoch_losses == pytest.approx([(a + b) / 2 for a, b in zip(*per_rank)], rel=1e-5)  # ... all six
    for rank, outcome in enumerate(outcomes):
        said = outcome["refusals"]
        assert "1 batches for 2 ranks" in said["short"]
        assert "checkpoint= is not supported with shard=True" in said["checkpoint"]
        assert "tensors on one real device, they are on ['meta']" in said["meta"]
        assert "already sharded (fully_shard)" in said["sharded"]
        where = "nan" if rank == 1 else "non-finite on another rank"
        assert f"loss became {where} at step 2" in said["nan"] and "back at its state before recover" in said["nan"]
        assert said["unchanged"]


def test_shard_needs_a_process_group_and_a_bool():
    teacher, student = pruned_pair()
    before = raw(student)
    with pytest.raises(pangkas.PangkasError, match="shard=True splits the student.*init_process_group"):
        pangkas.recover(student, batches(), teacher=teacher, shard=True)
    with pytest.raises(pangkas.PangkasError, match="shard must be True or False"):
        pangkas.recover(student, batches(), teacher=teacher, shard="fsdp")
    assert_identical(raw(student), before)


def _launch(command: list[str], cwd: Path) -> str:
    """Run a launcher in ``cwd`` (the script writes there) with this pangkas importable; its output."""
    paths = [str(Path(pangkas.__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    errors = "\n".join(line for line in done.stderr.splitlines() if "rank" in line or "Error" in line)
    assert done.returncode == 0, errors[-4000:]
    return done.stdout


def _readme_script(tmp_path) -> Path:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    script = tmp_path / "sharded_recover.py"
    script.write_text(re.search(r"```python sharded_recover.py\n(.*?)```", readme, re.S).group(1))
    return script


def test_the_readme_sharded_example_runs_under_torchrun(tmp_path):
    """The README's FSDP2 script (not run by test_readme: it needs two processes), as written."""
    script = _readme_script(tmp_path)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               str(script)]
    assert _launch(command, tmp_path).count("recovered for 20 steps") == 1  # 2 epochs of 10 rounds, by rank 0
    student = pangkas.load(tmp_path / "student.safetensors", _readme_student())
    assert get_mask(student[0][0]) is not None and (student[0][0].weight == 0).float().mean() > 0.6


def _readme_student():
    torch.manual_seed(0)
    student = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(4)], nn.Linear(64, 10))
    pangkas.prune_weights(student, sparsity=0.7)
    return student


def test_accelerate_launch_starts_the_readme_sharded_example(tmp_path):
    """accelerate launch as the README describes it: a launcher for the same script (its own FSDP
    does not run on CPU, and recover does not need it)."""
    pytest.importorskip("accelerate")
    config = tmp_path / "fsdp.yaml"
    config.write_text("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\nnum_machines: 1\nnum_processes: 2\n"
                      f"main_process_port: {_free_port()}\nmixed_precision: 'no'\n")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               str(_readme_script(tmp_path))]
    assert _launch(command, tmp_path).count("recovered for 20 steps") == 1  # 2 ranks: 10 rounds an epoch
