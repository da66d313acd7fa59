"""Pruning schedules: gradual magnitude pruning during training, and iterative prune -> recover.

``GradualPruning`` raises weight sparsity on the cubic schedule of Zhu & Gupta (2017),
``s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_1 - t_0))^3``, from ``start`` to ``end`` step every
``every`` steps: call ``.step(t)`` after the optimizer step in a plain loop, or pass
``.trainer_callback()`` to a Hugging Face ``Trainer``. ``iterative`` alternates pruning and
``recover`` for weights, channels or layers.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .errors import PangkasError


class GradualPruning:
    def __init__(self, model: nn.Module, final_sparsity: float, *, start: int, end: int, every: int = 1,
                 initial_sparsity: float = 0.0, **prune_options):
        if not 0 <= initial_sparsity <= final_sparsity < 1:
            raise PangkasError(f"need 0 <= initial_sparsity <= final_sparsity < 1, got "
                               f"{initial_sparsity!r} and {final_sparsity!r}")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end):
            raise PangkasError(f"need integer steps 0 <= start < end, got {start!r}, {end!r}")
        if not isinstance(every, int) or every < 1:
            raise PangkasError(f"every must be a positive integer, got {every!r}")
        self.model, self.final, self.initial = model, final_sparsity, initial_sparsity
        self.start, self.end, self.every, self.options = start, end, every, prune_options
        self.current = 0.0

    def sparsity_at(self, step: int) -> float:
        if step < self.start:
            return 0.0
        progress = min(1.0, (step - self.start) / (self.end - self.start))
        return self.final + (self.initial - self.final) * (1 - progress) ** 3

    def step(self, step: int):
        """Prune to this step's target if it is a pruning step; returns the report or None."""
        if step < self.start or (step - self.start) % self.every and step < self.end:
            return None
        target = self.sparsity_at(step)
        if target <= self.current:
            return None
        from .weights import prune_weights

        self.current = target
        return prune_weights(self.model, sparsity=target, **self.options)

    def trainer_callback(self):
        """The same schedule as a ``transformers.TrainerCallback`` (pruning after optimizer steps)."""
        import transformers

        schedule = self

        class GradualPruningCallback(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                schedule.step(state.global_step)

        return GradualPruningCallback()


def iterative(model: nn.Module, data: Iterable, *, kind: str, final: float | int, steps: int,
              example_inputs=None, recover_options: dict | None = None, **prune_options) -> list:
    """Prune towards ``final`` in ``steps`` rounds, recovering (``pangkas.recover`` with
    ``recover_options``, e.g. ``teacher=``) after each. ``kind``: ``"weights"`` (``final``
    sparsity, reached on the cubic curve), ``"channels"`` (``final`` fraction of channels gone
    overall: each round removes the same fraction of what is left) or ``"layers"`` (``final``
    blocks removed, spread over the rounds). Returns each round's pruning report."""
    from .channels import prune_channels
    from .layers import prune_layers
    from .recover import recover
    from .weights import prune_weights

    if not isinstance(steps, int) or steps < 1:
        raise PangkasError(f"steps must be a positive integer, got {steps!r}")
    if kind == "channels" and example_inputs is None:
        raise PangkasError("kind='channels' needs example_inputs=")
    reports = []
    for round_ in range(1, steps + 1):
        if kind == "weights":
            target = final * (1 - (1 - round_ / steps) ** 3)
            reports.append(prune_weights(model, sparsity=target, **prune_options))
        elif kind == "channels":
            each = 1 - (1 - final) ** (1 / steps)
            reports.append(prune_channels(model, example_inputs, ratio=each, **prune_options))
        elif kind == "layers":
            n = final * round_ // steps - final * (round_ - 1) // steps
            if n:
                reports.append(prune_layers(model, data, n=n, **prune_options))
        else:
            raise PangkasError(f"kind must be 'weights', 'channels' or 'layers', got {kind!r}")
        recover(model, data, **(recover_options or {}))
    return reports
