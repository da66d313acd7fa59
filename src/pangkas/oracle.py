"""The equivalence oracle for channel pruning.

Silence the channels a plan removes (``silence.py``: what reads them is zeroed, so they can no
longer affect the output), record the output, apply the plan, and compare. Exact pruning gives
the same output up to float rounding.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .channels import Plan
from .errors import PangkasError
from .inputs import call_model
from .outputs import tensors
from .silence import silence_removed


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights that make the oracle sensitive: random-init models often hide pruning errors
    behind zero-initialised heads, tiny layer scales or BatchNorm statistics of exactly 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    statistics = [(n, b) for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]
    for name, t in list(model.named_parameters()) + statistics:  # not buffers like RoPE frequencies
        if not t.is_floating_point():
            continue
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif t.ndim >= 2:
            bound = (3 / max(1, t[0].numel())) ** 0.5
            t.copy_((torch.rand(t.shape, generator=g) * 2 - 1) * bound)
        else:
            t.copy_(torch.rand(t.shape, generator=g) - 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model


def _flat(output) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors(output)])


@torch.no_grad()
def oracle_error(model: nn.Module, example_inputs, make_plan: Callable[[nn.Module], Plan],
                 dtype: torch.dtype | None = None) -> tuple[float, Plan]:
    """Relative output error of pruning a copy of ``model`` after silencing the removed channels
    (``make_plan(copy)`` builds the plan). Returns (error, the applied plan).

    ``dtype`` (e.g. ``torch.float64``) runs the silenced reference and the pruned model in that
    dtype: planning and surgery stay in the model's own dtype, and fp32 weights convert to fp64
    exactly, so only the rounding of the two runs changes. An ill-conditioned network whose fp32
    runs disagree by more than the tolerance can still be certified this way."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise PangkasError(f"oracle dtype must be a floating-point dtype, got {dtype}")
    model = copy.deepcopy(model).eval()
    plan = make_plan(model)
    silence_removed(plan)
    # On a copy: a forward may rebuild a buffer (convit's rel_indices), which would make the plan
    # refuse the model as changed since planning.
    reference = _run_as(copy.deepcopy(model), example_inputs, dtype)
    plan.apply()
    pruned = _run_as(model, example_inputs, dtype)
    return float((pruned - reference).norm() / reference.norm().clamp_min(1e-12)), plan


def _run_as(model: nn.Module, example_inputs, dtype: torch.dtype | None) -> torch.Tensor:
    """The model's flattened output (fp64), computed in ``dtype`` on a copy if given (the plan's
    surgery and checks expect the model in its own dtype)."""
    if dtype is None:
        return _flat(call_model(model, example_inputs)).double()
    floating = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    return _flat(call_model(copy.deepcopy(model).to(dtype), tree_map(floating, example_inputs))).double()
