"""Recovering accuracy after pruning: fine-tuning with knowledge distillation.

``recover`` trains a pruned student on ``data``, distilling from the unpruned teacher (logit KL
with temperature, or MSE on the outputs), optionally plus a task loss and feature-map MSE between
mapped layers. Weight masks stay enforced (they are parametrizations). It runs in one process or,
launched by ``torchrun``, in many: the student is wrapped in ``DistributedDataParallel`` and each
rank takes every world-size-th batch. Checkpoints (model with its masks, optimizer state, step)
are written atomically and resumed from; a non-finite loss stops training with a clear error and
the student back at its last good state.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from .errors import PangkasError
from .inputs import call_model
from .io import load, save
from .progress import track

LOSSES = ("kd", "mse", "task")


def _first(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, dict):
        output = list(output.values())
    return next(t for t in output if isinstance(t, torch.Tensor))


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation loss: KL(teacher || student) on softened logits, times T^2."""
    t = temperature
    return nn.functional.kl_div(nn.functional.log_softmax(student / t, dim=-1),
                                nn.functional.log_softmax(teacher / t, dim=-1),
                                reduction="batchmean", log_target=True) * t * t


@dataclass
class RecoveryReport:
    steps: int
    epoch_losses: list[float] = field(default_factory=list)
    resumed_from: int = 0
    checkpoint: Path | None = None

    def __str__(self) -> str:
        losses = ", ".join(f"{x:.4f}" for x in self.epoch_losses)
        resumed = f", resumed at step {self.resumed_from}" if self.resumed_from else ""
        return f"recovered for {self.steps} steps{resumed}; mean loss per epoch: {losses}"


# -- checkpoints -----------------------------------------------------------------------------

def _save_checkpoint(directory: Path, model: nn.Module, optimizer, step: int, epoch: int) -> None:
    """model.safetensors (pangkas.save: weights and masks) + trainer.safetensors (optimizer
    tensors; step, epoch and the rest of the optimizer state as JSON), swapped in atomically."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        save(model, staging / "model.safetensors")
        state = optimizer.state_dict()
        tensors, scalars = {}, {}
        for index, slots in state["state"].items():
            for key, value in slots.items():
                if isinstance(value, torch.Tensor) and value.ndim > 0:
                    tensors[f"{index}.{key}"] = value.detach().contiguous()
                else:
                    scalars[f"{index}.{key}"] = float(value)
        meta = {"step": step, "epoch": epoch, "param_groups": state["param_groups"], "scalars": scalars}
        safetensors.torch.save_file(tensors, str(staging / "trainer.safetensors"),
                                    metadata={"trainer": json.dumps(meta)})
        old = directory.with_name(directory.name + ".old")
        if directory.exists():
            directory.rename(old)
        staging.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _finish_swap(directory: Path) -> None:
    """A crash between the two renames of ``_save_checkpoint`` leaves only ``<dir>.old``, the
    last complete checkpoint: put it back."""
    old = directory.with_name(directory.name + ".old")
    if old.is_dir() and not directory.exists():
        old.rename(directory)


def _load_checkpoint(directory: Path, model: nn.Module, optimizer) -> tuple[int, int]:
    load(directory / "model.safetensors", model)
    path = directory / "trainer.safetensors"
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["trainer"])
        tensors = safetensors.torch.load_file(str(path))
    except Exception as exc:
        raise PangkasError(f"{path} is not a readable pangkas checkpoint: {exc}") from exc
    state: dict = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = torch.tensor(value)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["step"], meta["epoch"]


# -- training --------------------------------------------------------------------------------

def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _check(data, loss, teacher, task_loss, epochs, lr, temperature, alpha) -> None:
    if loss not in LOSSES:
        raise PangkasError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    if loss in ("kd", "mse") and teacher is None:
        raise PangkasError(f"loss={loss!r} distils from a teacher: pass teacher= (the unpruned model)")
    if loss == "task" and task_loss is None:
        raise PangkasError("loss='task' needs task_loss=(output, batch) -> scalar")
    if not isinstance(epochs, int) or epochs < 1:
        raise PangkasError(f"epochs must be a positive integer, got {epochs!r}")
    for name, value, low in (("lr", lr, 0), ("temperature", temperature, 0)):
        if not isinstance(value, (int, float)) or value <= low:
            raise PangkasError(f"{name} must be a number > {low}, got {value!r}")
    if not 0 <= alpha <= 1:
        raise PangkasError(f"alpha must be in [0, 1] (weight of the distillation term), got {alpha!r}")
    if isinstance(data, (torch.Tensor, dict)):
        raise PangkasError("data must be an iterable of batches, not a single batch: wrap it in a list")


def recover(
    student: nn.Module,
    data: Iterable,
    *,
    teacher: nn.Module | None = None,
    loss: str = "kd",
    task_loss: Callable | None = None,
    alpha: float = 1.0,
    temperature: float = 2.0,
    features: dict[str, str] | None = None,
    feature_weight: float = 1.0,
    epochs: int = 1,
    lr: float = 1e-3,
    optimizer: Callable | None = None,
    checkpoint: str | os.PathLike | None = None,
    inputs: Callable | None = None,
    seed: int = 0,
) -> RecoveryReport:
    """Fine-tune ``student`` on ``data`` (re-iterable batches) for ``epochs``.

    ``loss``: ``"kd"`` (KL on logits softened by ``temperature``, from ``teacher``), ``"mse"``
    (MSE to the teacher's outputs, for embeddings or regression), or ``"task"``
    (``task_loss(output, batch)`` only). With a teacher and ``task_loss`` both, the loss is
    ``alpha * distillation + (1 - alpha) * task``. ``features`` maps student module names to
    teacher module names whose outputs must match (MSE, times ``feature_weight``).
    ``optimizer(params) -> Optimizer`` defaults to Adam(lr). ``checkpoint``: a directory written
    atomically after every epoch and resumed from if it exists. ``inputs(batch)`` picks what the
    models are called with when batches also carry targets (e.g. ``lambda b: b[0]``); the loss
    functions still get the whole batch.
    """
    _check(data, loss, teacher, task_loss, epochs, lr, temperature, alpha)
    rank, world = _distributed()
    torch.manual_seed(seed)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = optimizer(params) if optimizer is not None else torch.optim.Adam(params, lr=lr)
    directory = Path(checkpoint) if checkpoint is not None else None
    step = start_epoch = 0
    if directory is not None:
        _finish_swap(directory)
    if directory is not None and (directory / "trainer.safetensors").is_file():
        step, start_epoch = _load_checkpoint(directory, student, opt)
    report = RecoveryReport(step, resumed_from=step, checkpoint=directory)
    model = student
    if world > 1:
        model = nn.parallel.DistributedDataParallel(student)
    if teacher is not None:
        teacher.eval()
    feature_pairs = _feature_hooks(student, teacher, features)
    try:
        for epoch in range(start_epoch, epochs):
            total, batches = 0.0, 0
            student.train()
            for index, batch in enumerate(track(list(data), f"recovering: epoch {epoch + 1}/{epochs}")):
                if index % world != rank:
                    continue
                value = _step(model, teacher, batch, inputs(batch) if inputs else batch, loss, task_loss,
                              alpha, temperature, feature_pairs, feature_weight, opt)
                if not math.isfinite(value):
                    _restore_good(student, opt, directory)
                    raise PangkasError(f"the loss became {value} at step {step + 1} (epoch {epoch + 1}); "
                                       "training stopped" + (f", the student is back at {directory}"
                                                             if directory is not None else "")
                                       + ". Lower lr= or check the data.")
                total, batches, step = total + value, batches + 1, step + 1
            report.epoch_losses.append(total / max(1, batches))
            if directory is not None and rank == 0:
                _save_checkpoint(directory, student, opt, step, epoch + 1)
            if world > 1:
                torch.distributed.barrier()
    finally:
        for handle in feature_pairs.get("handles", []):
            handle.remove()
        student.eval()
    report.steps = step
    return report


def _restore_good(student, opt, directory) -> None:
    if directory is not None and (directory / "trainer.safetensors").is_file():
        _load_checkpoint(directory, student, opt)


def _feature_hooks(student, teacher, features) -> dict:
    if not features:
        return {}
    if teacher is None:
        raise PangkasError("features= matches student layers to teacher layers: pass teacher=")
    store = {"student": {}, "teacher": {}, "pairs": list(features.items()), "handles": []}
    for side, model, names in (("student", student, features.keys()), ("teacher", teacher, features.values())):
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError as exc:
                raise PangkasError(f"features: {side} has no module {name!r}") from exc

            def hook(mod, args, output, side=side, name=name):
                store[side][name] = _first(output)

            store["handles"].append(module.register_forward_hook(hook))
    return store


def _step(model, teacher, batch, x, loss, task_loss, alpha, temperature, features, feature_weight, opt) -> float:
    try:
        output = call_model(model, x)
    except PangkasError:
        raise
    except Exception as exc:
        raise PangkasError(f"the student does not run on a batch of data: {type(exc).__name__}: {exc}") from exc
    terms = []
    if teacher is not None and loss in ("kd", "mse"):
        with torch.no_grad():
            target = _first(call_model(teacher, x))
        got = _first(output)
        if got.shape != target.shape:
            raise PangkasError(f"teacher output {tuple(target.shape)} does not match the student's "
                               f"{tuple(got.shape)}: distillation needs the same output shape")
        distil = kd_loss(got, target, temperature) if loss == "kd" else nn.functional.mse_loss(got, target)
        terms.append(alpha * distil if task_loss is not None else distil)
    if task_loss is not None:
        terms.append((1 - alpha) * task_loss(output, batch) if loss != "task" else task_loss(output, batch))
    for student_name, teacher_name in features.get("pairs", []):
        s, t = features["student"][student_name], features["teacher"][teacher_name]
        if s.shape != t.shape:
            raise PangkasError(f"features: {student_name} {tuple(s.shape)} vs {teacher_name} {tuple(t.shape)}; "
                               "map layers whose outputs have the same shape")
        terms.append(feature_weight * nn.functional.mse_loss(s, t.detach()))
    total = sum(terms)
    value = float(total.detach())
    if math.isfinite(value):
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    return value
