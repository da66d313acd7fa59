"""Recovering accuracy after pruning: fine-tuning with knowledge distillation.

``recover`` trains a pruned student on ``data``, distilling from the unpruned teacher (logit KL
with temperature, or MSE on the outputs: ``objective=``), optionally plus the user's loss
(``loss_fn=``) and feature-map MSE between mapped layers. Weight masks stay enforced (they are parametrizations).

Launched by ``torchrun``, every rank passes the same ``data``; the student is wrapped in
``DistributedDataParallel`` and the batches are dealt out in rounds of world-size: rank r takes
the r-th batch of every complete round and an incomplete last round is dropped, so every rank
takes the same number of steps (a rank with one step more would wait forever in the gradient
all-reduce).

With ``shard=True`` (FSDP2, ``torch.distributed.fsdp.fully_shard``) recover trains a sharded copy
instead: built on the meta device, each repeated block (``blocks_of``) and then the root made an
FSDP unit, each rank's shard sliced from the student. Parameters, gradients and optimizer state
are split across the ranks; the caller's student is left untouched until the end, when the trained
weights are gathered into it on every rank. The teacher is used as passed: the caller holds it
whole on every rank anyway and it has no gradients or optimizer state, so a sharded copy would add
memory, not save it.

Checkpoints (``checkpoint.py``: model with its masks, optimizer state, step) are written by rank 0
after every epoch, crash-safely, and resumed from. On any failure (a non-finite loss, an error, an
interrupt) the student goes back to the newest checkpoint or, without one, to its state when
``recover`` was called.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import apply_checkpoint, check_resumable, is_complete, prepare, read_trainer, save_checkpoint
from .deprecation import renamed
from .errors import OperationFailed, PangkasError
from .inputs import call_model
from .outputs import primary_tensor
from .progress import track
from .sharded import check_shardable, sharded_copy, unshard_into
from .weights.masks import masks_by_key, plain_name, remove_mask, set_mask

OBJECTIVES = ("kd", "mse", "task")


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


def _resume(directory: Path, student: nn.Module, optimizer, start: _Snapshot, world: int) -> tuple[int, int]:
    """Make ``directory`` safe to use (rank 0), then load the same checkpoint on every rank if there
    is one: the (step, epoch) to continue from. The student is untouched unless it all fits."""
    _on_rank0(functools.partial(prepare, directory), world)
    meta = tensors = None
    problem = None
    try:
        if is_complete(directory):
            meta, tensors = read_trainer(directory)
            check_resumable(directory, meta, optimizer, _names(student))
    except PangkasError as exc:
        if world == 1:
            raise
        problem = str(exc)
    found = (meta["step"], meta["epoch"]) if meta is not None else None
    views = _gathered((problem, found), world)
    problems = [p for p, _ in views if p]
    if problems:
        raise PangkasError(problems[0])
    if len({f for _, f in views}) > 1:
        raise PangkasError(f"the ranks see different checkpoints in {directory} ((step, epoch) per rank: "
                           f"{[f for _, f in views]}); put it on a file system every rank shares")
    if found is None:
        return 0, 0
    try:
        apply_checkpoint(directory, student, optimizer, meta, tensors)
    except PangkasError:
        raise  # load() leaves the student as it was
    except Exception as exc:
        start.restore(student)
        raise PangkasError(f"cannot resume from {directory}: {type(exc).__name__}: {exc}; the student "
                           "is unchanged") from exc
    return found


def _names(model: nn.Module) -> dict[int, str]:
    return {id(p): plain_name(name) for name, p in model.named_parameters()}


class _Snapshot:
    """A CPU copy of the student's parameters, buffers and masks, and its train/eval modes."""

    def __init__(self, model: nn.Module):
        self.tensors = {name: t.detach().to("cpu", copy=True) for name, t in _tensors(model)}
        self.masks = {key: mask.to("cpu", copy=True) for key, mask in masks_by_key(model).items()}
        self.modes = [(module, module.training) for module in model.modules()]

    def restore(self, model: nn.Module) -> None:
        masks = masks_by_key(model)
        for key in masks.keys() - self.masks.keys():  # loading a checkpoint can add masks
            module, _, name = key.rpartition(".")
            remove_mask(model.get_submodule(module), name, keep_zeros=False)
        for key in self.masks.keys() - masks.keys():
            module, _, name = key.rpartition(".")
            set_mask(model.get_submodule(module), self.masks[key], name)
        with torch.no_grad():
            for name, t in _tensors(model):
                t.copy_(self.tensors[name])
        self.restore_modes()

    def restore_modes(self) -> None:
        for module, training in self.modes:
            module.training = training


class _Modes(_Snapshot):
    """The train/eval modes only: for a student that training does not touch."""

    def __init__(self, model: nn.Module):
        self.modes = [(module, module.training) for module in model.modules()]

    def restore(self, model: nn.Module) -> None:
        self.restore_modes()


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


# -- training --------------------------------------------------------------------------------

def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _check(data, objective, teacher, loss_fn, epochs, lr, temperature, alpha) -> None:
    if objective not in OBJECTIVES:
        raise PangkasError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    if objective in ("kd", "mse") and teacher is None:
        raise PangkasError(f"objective={objective!r} distils from a teacher: pass teacher= (the unpruned model)")
    if objective == "task" and loss_fn is None:
        raise PangkasError("objective='task' needs loss_fn=(output, batch) -> scalar")
    if not isinstance(epochs, int) or epochs < 1:
        raise PangkasError(f"epochs must be a positive integer, got {epochs!r}")
    for name, value, low in (("lr", lr, 0), ("temperature", temperature, 0)):
        if not isinstance(value, (int, float)) or value <= low:
            raise PangkasError(f"{name} must be a number > {low}, got {value!r}")
    if not 0 <= alpha <= 1:
        raise PangkasError(f"alpha must be in [0, 1] (weight of the distillation term), got {alpha!r}")
    if isinstance(data, (torch.Tensor, dict)):
        raise PangkasError("data must be an iterable of batches, not a single batch: wrap it in a list")


def _gathered(value, world: int) -> list:
    """``value`` from every rank, in rank order."""
    if world == 1:
        return [value]
    values = [None] * world
    torch.distributed.all_gather_object(values, value)
    return values


def _on_rank0(action: Callable[[], None], world: int) -> None:
    """Run ``action`` on rank 0 only, the others waiting; if it fails, every rank raises (a rank
    raising alone would leave the others waiting forever)."""
    if world == 1:
        action()
        return
    problem = [None]
    if torch.distributed.get_rank() == 0:
        try:
            action()
        except Exception as exc:
            problem = [f"on rank 0: {type(exc).__name__}: {exc}"]
    torch.distributed.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise PangkasError(problem[0])


def _finite_everywhere(loss: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every rank: all stop together, or none."""
    finite = torch.isfinite(loss.detach()).all().reshape(1).to(torch.int32)
    if world > 1:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())


def _shard(data: Iterable, rank: int, world: int) -> Iterator:
    """This rank's batches: the rank-th of every complete round of ``world`` batches, read as they
    come (``data`` need not have a len()); an incomplete last round is dropped."""
    mine = None
    for index, batch in enumerate(data):
        if index % world == rank:
            mine = batch
        if index % world == world - 1:
            yield mine


def _check_data(data: Iterable, epochs: int, world: int) -> int | None:
    """The number of batches, or None when ``data`` has no len(); refuses data that cannot feed
    every epoch and every rank."""
    if isinstance(data, Iterator) and epochs > 1:
        raise PangkasError(f"data is a one-shot iterator ({type(data).__name__}): it runs dry after the "
                           f"first of epochs={epochs}; pass a list or a re-iterable such as a DataLoader")
    try:
        size = len(data)
    except TypeError:
        size = None
    if size == 0:
        raise PangkasError("data is empty: pass at least one batch")
    if size is not None and size < world:
        raise PangkasError(f"data has {size} batches for {world} ranks; each rank needs one per round of "
                           f"{world} batches: pass at least {world}")
    sizes = _gathered(size, world)
    if any(n != sizes[0] for n in sizes):
        raise PangkasError(f"the ranks pass different numbers of batches ({sizes}); pass the same data on "
                           "every rank: recover deals the batches out itself")
    return size


@renamed(loss="objective", task_loss="loss_fn")
def recover(
    student: nn.Module,
    data: Iterable,
    *,
    teacher: nn.Module | None = None,
    objective: str = "kd",
    loss_fn: Callable | None = None,
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
    shard: bool = False,
) -> RecoveryReport:
    """Fine-tune ``student`` on ``data`` for ``epochs``.

    ``data`` is iterated afresh every epoch, never held whole: a list, a DataLoader or any
    re-iterable of batches; a one-shot iterator (a generator) only with ``epochs=1``.
    ``objective``: ``"kd"`` (KL on logits softened by ``temperature``, from ``teacher``), ``"mse"``
    (MSE to the teacher's outputs, for embeddings or regression), or ``"task"``
    (``loss_fn(output, batch)`` only). With a teacher and ``loss_fn`` both, the loss is
    ``alpha * distillation + (1 - alpha) * loss_fn``. ``features`` maps student module names to
    teacher module names whose outputs must match (MSE, times ``feature_weight``).
    ``optimizer(params) -> Optimizer`` defaults to Adam(lr). ``inputs(batch)`` picks what the
    models are called with when batches also carry targets (e.g. ``lambda b: b[0]``); the loss
    functions still get the whole batch. ``seed`` seeds torch's global generator (dropout).

    ``checkpoint``: a directory (new, empty, or holding a checkpoint of an earlier run, which is
    resumed after checking that it fits the student and the optimizer) that gets a checkpoint
    after every epoch, crash-safely; anything else there is refused, untouched.

    Under ``torchrun`` every rank passes the same ``data`` and takes the rank-th batch of each
    complete round of world-size batches; a last incomplete round is dropped (deterministically,
    every epoch), so all ranks take the same steps. Rank 0 writes the checkpoints.

    ``shard=True`` (under torchrun) trains with FSDP2 instead of DDP: a copy of the student whose
    parameters, gradients and optimizer state are split across the ranks (each repeated block a
    unit), for students whose training state does not fit one process. The trained weights are
    gathered back into ``student`` on every rank at the end; until then it is untouched. Not with
    ``checkpoint=``. ``optimizer`` then gets the copy's (DTensor) parameters.

    On failure the student is back at the newest checkpoint or, without one, at its state when
    ``recover`` was called (a CPU copy is kept for this, unless ``shard=True``); the error says which.
    """
    _check(data, objective, teacher, loss_fn, epochs, lr, temperature, alpha)
    if shard not in (True, False):
        raise PangkasError(f"shard must be True or False, got {shard!r}")
    if shard:
        check_shardable(student, checkpoint)
    rank, world = _distributed()
    size = _check_data(data, epochs, world)
    directory = Path(os.path.realpath(checkpoint)) if checkpoint is not None else None
    torch.manual_seed(seed)
    trained = sharded_copy(student) if shard else student
    params = [p for p in trained.parameters() if p.requires_grad]
    opt = optimizer(params) if optimizer is not None else torch.optim.Adam(params, lr=lr)
    training_loss = _TrainingLoss(teacher, objective, loss_fn, alpha, temperature,
                                  _feature_hooks(trained, teacher, features), feature_weight, inputs)
    try:
        start = _Modes(student) if shard else _Snapshot(student)  # sharded: the student is not trained
        step, first_epoch = _resume(directory, student, opt, start, world) if directory else (0, 0)
        report = RecoveryReport(step, resumed_from=step,
                                checkpoint=Path(checkpoint) if checkpoint is not None else None)
        model = nn.parallel.DistributedDataParallel(student) if world > 1 and not shard else trained
        if teacher is not None:
            teacher.eval()
        try:
            for epoch in range(first_epoch, epochs):
                batches = track(_shard(data, rank, world), f"recovering: epoch {epoch + 1}/{epochs}",
                                total=None if size is None else size // world)
                mean, step = _epoch(model, batches, training_loss, opt, step, epoch, world)
                report.epoch_losses.append(mean)
                if directory is not None:
                    write = functools.partial(save_checkpoint, directory, student, opt, step, epoch + 1)
                    _on_rank0(write, world)
            if shard:
                unshard_into(student, trained)
        except BaseException as exc:
            _fail(exc, student, opt, directory, start)
    finally:
        for handle in training_loss.features.get("handles", []):
            handle.remove()
    student.eval()
    report.steps = step
    return report


class _Diverged(Exception):
    """A non-finite loss (on any rank)."""


def _epoch(model, batches, training_loss, opt, step: int, epoch: int, world: int) -> tuple[float, int]:
    """One pass over this rank's batches: (mean loss, the step count after it)."""
    total, count = 0.0, 0
    model.train()
    for batch in batches:
        loss = training_loss(model, batch)
        value = float(loss.detach())
        if not _finite_everywhere(loss, world):
            said = value if not math.isfinite(value) else "non-finite on another rank"
            raise _Diverged(f"the loss became {said} at step {step + 1} (epoch {epoch + 1})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total, count, step = total + value, count + 1, step + 1
    if count == 0:
        per_rank = f" (or fewer than {world}, one per rank)" if world > 1 else ""
        raise PangkasError(f"epoch {epoch + 1} got no batches from data{per_rank}; pass data that yields "
                           "batches every epoch")
    return total / count, step


def _fail(exc: BaseException, student, opt, directory, start: _Snapshot):
    """Put the student back, then raise ``exc`` saying where the student is."""
    where = _restore(student, opt, directory, start)
    if isinstance(exc, _Diverged):
        raise OperationFailed(f"{exc}; training stopped and {where}. Lower lr= or check the data.") from None
    if isinstance(exc, PangkasError):
        raise PangkasError(f"{exc} ({where})") from exc
    if hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note(f"pangkas.recover: {where}")
    raise exc


def _restore(student, opt, directory, start: _Snapshot) -> str:
    """Put the student back at the newest checkpoint or, without one, at ``start``; say which."""
    if directory is not None and is_complete(directory):
        try:
            meta, tensors = read_trainer(directory)
            apply_checkpoint(directory, student, opt, meta, tensors)
            start.restore_modes()
            return f"the student is back at the checkpoint of step {meta['step']} in {directory}"
        except Exception:  # unreadable now: the state at the start is the next best
            pass
    start.restore(student)
    return "the student is back at its state before recover"


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
                for handle in store["handles"]:  # the models stay as they were
                    handle.remove()
                raise PangkasError(f"features: {side} has no module {name!r}") from exc

            def hook(mod, args, output, side=side, name=name):
                store[side][name] = primary_tensor(output)

            store["handles"].append(module.register_forward_hook(hook))
    return store


@dataclass
class _TrainingLoss:
    """The loss ``recover`` minimises, from its options."""

    teacher: nn.Module | None
    objective: str
    loss_fn: Callable | None
    alpha: float
    temperature: float
    features: dict
    feature_weight: float
    inputs: Callable | None

    def __call__(self, model: nn.Module, batch) -> torch.Tensor:
        x = self.inputs(batch) if self.inputs else batch
        try:
            output = call_model(model, x)
        except PangkasError:
            raise
        except Exception as exc:
            raise PangkasError(f"the student does not run on a batch of data: {type(exc).__name__}: {exc}") from exc
        terms = []
        if self.teacher is not None and self.objective in ("kd", "mse"):
            terms.append(self._distillation(primary_tensor(output), x))
        if self.loss_fn is not None:
            task = self.loss_fn(output, batch)
            terms.append((1 - self.alpha) * task if self.objective != "task" else task)
        for student_name, teacher_name in self.features.get("pairs", []):
            s, t = self.features["student"][student_name], self.features["teacher"][teacher_name]
            if s.shape != t.shape:
                raise PangkasError(f"features: {student_name} {tuple(s.shape)} vs {teacher_name} {tuple(t.shape)}; "
                                   "map layers whose outputs have the same shape")
            terms.append(self.feature_weight * nn.functional.mse_loss(s, t.detach()))
        return sum(terms)

    def _distillation(self, got: torch.Tensor, x) -> torch.Tensor:
        with torch.no_grad():
            target = primary_tensor(call_model(self.teacher, x))
        if got.shape != target.shape:
            raise PangkasError(f"teacher output {tuple(target.shape)} does not match the student's "
                               f"{tuple(got.shape)}: distillation needs the same output shape")
        distil = (kd_loss(got, target, self.temperature) if self.objective == "kd"
                  else nn.functional.mse_loss(got, target))
        return self.alpha * distil if self.loss_fn is not None else distil
