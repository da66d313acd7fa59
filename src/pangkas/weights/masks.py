"""Masks that last: a ``torch.nn.utils.parametrize`` parametrization multiplies each pruned weight
by its mask on every access, so no optimizer step can bring a pruned weight back.

State-dict hooks keep the module's keys those of the unpruned model (``conv.weight``, holding the
masked values), so a pruned model's state_dict loads into a fresh instance and back.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import PangkasError


class WeightMask(nn.Module):
    """Parametrization ``weight -> where(mask, weight, 0)``; the mask is a non-persistent buffer."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # where(), not multiply: a pruned inf/nan must still read as exactly zero.
        return torch.where(self.mask, weight, 0.0)


def _original_key(prefix: str, name: str) -> str:
    return f"{prefix}parametrizations.{name}.original"


def _masked_names(module: nn.Module) -> list[str]:
    if not parametrize.is_parametrized(module):
        return []
    return [n for n, chain in module.parametrizations.items() if isinstance(chain[0], WeightMask)]


def _state_dict_post_hook(module, state_dict, prefix, local_metadata):
    for name in _masked_names(module):
        key = _original_key(prefix, name)
        if key in state_dict:
            del state_dict[key]
            state_dict[prefix + name] = getattr(module, name).detach()


def _load_state_dict_pre_hook(module, state_dict, prefix, *args):
    for name in _masked_names(module):
        if prefix + name in state_dict:
            state_dict[_original_key(prefix, name)] = state_dict.pop(prefix + name)


def _add_hooks(module: nn.Module) -> None:
    # The public names arrived in torch 2.5; 2.4 only has the private ones.
    if hasattr(module, "register_state_dict_post_hook"):
        module.register_state_dict_post_hook(_state_dict_post_hook)
        module.register_load_state_dict_pre_hook(_load_state_dict_pre_hook)
    else:  # pragma: no cover - torch 2.4
        module._register_state_dict_hook(_state_dict_post_hook)
        module._register_load_state_dict_pre_hook(_load_state_dict_pre_hook, with_module=True)


def _remove_hooks(module: nn.Module) -> None:
    # Hooks are found by identity: storing handles on the module would not survive deepcopy cleanly.
    ours = (_state_dict_post_hook, _load_state_dict_pre_hook)
    for hooks in (module._state_dict_hooks, module._load_state_dict_pre_hooks):
        for key, hook in list(hooks.items()):
            if getattr(hook, "hook", hook) in ours:
                del hooks[key]


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own before changing its parametrizations.

    parametrize injects a class per module, but ``copy.deepcopy`` shares it between original and
    copy; adding or removing a parametrization edits that class, which would break the other one.
    """
    cls = module.__class__
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def get_mask(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The boolean keep-mask of ``module.<name>``, or None if it is not masked."""
    if name not in _masked_names(module):
        return None
    return module.parametrizations[name][0].mask


def underlying_parameter(module: nn.Module, name: str = "weight") -> nn.Parameter:
    """The Parameter behind ``module.<name>``: itself, or the original under a pangkas mask."""
    if name in _masked_names(module):
        return module.parametrizations[name].original
    if parametrize.is_parametrized(module, name):
        raise PangkasError(
            f"{type(module).__name__}.{name} already has a parametrization that pangkas did not add; "
            "remove it (torch.nn.utils.parametrize.remove_parametrizations) or exclude this module"
        )
    return getattr(module, name)


def set_mask(module: nn.Module, mask: torch.Tensor, name: str = "weight") -> None:
    """Mask ``module.<name>`` with ``mask`` (True = keep), replacing any earlier pangkas mask."""
    current = get_mask(module, name)
    if current is not None:
        current.copy_(mask)
        return
    tensor = underlying_parameter(module, name)
    if mask.shape != tensor.shape:
        raise PangkasError(f"mask shape {tuple(mask.shape)} does not match {name} {tuple(tensor.shape)}")
    had_hooks = bool(_masked_names(module))
    if parametrize.is_parametrized(module):
        _own_class(module)
    # unsafe: skips torch's trial call (a pass over the weight); where() keeps shape and dtype.
    parametrize.register_parametrization(module, name, WeightMask(mask.to(tensor.device)), unsafe=True)
    if not had_hooks:
        _add_hooks(module)


def remove_mask(module: nn.Module, name: str = "weight", keep_zeros: bool = True) -> None:
    """Drop the mask of ``module.<name>``. With ``keep_zeros`` the parameter keeps the masked values
    (the same Parameter object, so optimizers still point at it); without, the unmasked original."""
    if name not in _masked_names(module):
        return
    _own_class(module)
    parametrize.remove_parametrizations(module, name, leave_parametrized=keep_zeros)
    if not _masked_names(module):
        _remove_hooks(module)


def masked_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(module name, module, tensor name) for every tensor pangkas masks in ``model``."""
    for module_name, module in model.named_modules():
        for name in _masked_names(module):
            yield module_name, module, name


def state_key(module_name: str, tensor_name: str) -> str:
    return f"{module_name}.{tensor_name}" if module_name else tensor_name


def masks_by_key(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every pangkas mask in ``model``, by the state-dict key of the tensor it masks."""
    return {state_key(m, t): get_mask(module, t) for m, module, t in masked_modules(model)}


def finalize(model: nn.Module) -> nn.Module:
    """Remove all pruning machinery, leaving plain modules whose pruned weights are zeros."""
    for _, module, name in list(masked_modules(model)):
        remove_mask(module, name)
    return model


def plain_name(parameter_name: str) -> str:
    """``conv.parametrizations.weight.original`` -> ``conv.weight``: the name a user knows."""
    return re.sub(r"parametrizations\.([^.]+)\.original$", r"\1", parameter_name)


def effective_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter under its plain name, as the model computes with it (masks applied)."""
    state = model.state_dict()
    return {plain_name(n): state[plain_name(n)] for n, _ in model.named_parameters()}


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) of the model as it computes."""
    tensors = effective_parameters(model).values()
    return sum(t.numel() for t in tensors), sum(int(torch.count_nonzero(_values(t))) for t in tensors)


def _values(t: torch.Tensor) -> torch.Tensor:
    """The numbers a tensor stands for: a quantized tensor subclass (torchao's int8) de-quantized,
    as it cannot count its own non-zeros."""
    return t if type(t) in (torch.Tensor, nn.Parameter) else t.dequantize()
