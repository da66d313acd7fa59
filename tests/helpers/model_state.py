"""Everything about a model that pangkas must leave as it found it, and a comparison that names
what changed: tensors (values, dtype, device, storage, requires_grad, grad), which objects sit
under which names, module classes and train/eval flags, hooks, plain attributes, and the global
random state."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                "_state_dict_hooks", "_load_state_dict_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_module_registration_hooks",
                 "_global_parameter_registration_hooks", "_global_buffer_registration_hooks")
_NOT_PLAIN = {"_parameters", "_buffers", "_modules", "training", *_HOOK_TABLES}


@dataclass
class _Tensor:
    obj: torch.Tensor
    value: torch.Tensor
    data_ptr: int
    requires_grad: bool
    grad: torch.Tensor | None


@dataclass
class ModelState:
    tensors: dict[str, _Tensor]            # parameters and buffers, under every name
    modules: dict[str, tuple]              # name -> (object, class, training)
    hooks: dict[str, tuple]                # name -> hook ids per table
    attributes: dict[str, dict]            # name -> plain attributes (tensors by identity)
    global_hooks: tuple
    rng: torch.Tensor


def _copy(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


def snapshot(model: nn.Module) -> ModelState:
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    tensors = {n: _Tensor(t, _copy(t), t.data_ptr(), t.requires_grad, _copy(t.grad)) for n, t in named}
    modules = dict(model.named_modules(remove_duplicate=False))
    return ModelState(
        tensors=tensors,
        modules={n: (m, type(m), m.training) for n, m in modules.items()},
        hooks={n: tuple(tuple(getattr(m, table, {})) for table in _HOOK_TABLES) for n, m in modules.items()},
        attributes={n: {k: v for k, v in vars(m).items() if k not in _NOT_PLAIN} for n, m in modules.items()},
        global_hooks=tuple(tuple(getattr(nn.modules.module, h, {})) for h in _GLOBAL_HOOKS),
        rng=torch.get_rng_state(),
    )


def _same_value(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False  # a tensor attribute must be the very same object
    try:
        return bool(a == b)
    except Exception:  # objects whose == is not a bool (arrays): only identity counts
        return False


def _tensor_changes(name: str, before: _Tensor, now: torch.Tensor) -> list[str]:
    if now is not before.obj:
        return [f"{name}: a different tensor object"]
    if now.device != before.value.device or now.dtype != before.value.dtype:
        return [f"{name}: now {now.dtype} on {now.device}, was {before.value.dtype} on {before.value.device}"]
    changes = []
    if now.shape != before.value.shape or not torch.equal(now.detach(), before.value):
        changes.append(f"{name}: values changed")
    if now.data_ptr() != before.data_ptr:
        changes.append(f"{name}: holds different storage")
    if now.requires_grad != before.requires_grad:
        changes.append(f"{name}: requires_grad {before.requires_grad} -> {now.requires_grad}")
    if (now.grad is None) != (before.grad is None) or (
            now.grad is not None and not torch.equal(now.grad, before.grad)):
        changes.append(f"{name}: .grad changed")
    return changes


def changes(model: nn.Module, before: ModelState, rng: bool = True) -> list[str]:
    """What differs between ``model`` now and ``before`` (empty: nothing); ``rng=False`` skips
    the global random state (for calls given a user function that may draw from it)."""
    now = snapshot(model)
    found = []
    if list(now.tensors) != list(before.tensors):
        found.append(f"parameter/buffer names {list(before.tensors)} -> {list(now.tensors)}")
    for name in now.tensors.keys() & before.tensors.keys():
        found += _tensor_changes(name, before.tensors[name], now.tensors[name].obj)
    if list(now.modules) != list(before.modules):
        found.append(f"module names {list(before.modules)} -> {list(now.modules)}")
    for name in now.modules.keys() & before.modules.keys():
        (obj, cls, training), (obj0, cls0, training0) = now.modules[name], before.modules[name]
        if obj is not obj0 or cls is not cls0 or training != training0:
            found.append(f"module {name!r}: {cls0.__name__} training={training0} -> "
                         f"{'another object ' if obj is not obj0 else ''}{cls.__name__} training={training}")
        if now.hooks[name] != before.hooks[name]:
            found.append(f"module {name!r}: hooks changed")
        found += _attribute_changes(name, before.attributes[name], now.attributes[name])
    if now.global_hooks != before.global_hooks:
        found.append("global module hooks changed")
    if rng and not torch.equal(now.rng, before.rng):
        found.append("the global random state was consumed")
    return found


def _attribute_changes(module: str, before: dict, now: dict) -> list[str]:
    found = [f"module {module!r}: attribute {k!r} {'added' if k in now else 'removed'}"
             for k in now.keys() ^ before.keys()]
    return found + [f"module {module!r}: attribute {k!r} changed" for k in now.keys() & before.keys()
                    if not _same_value(now[k], before[k])]
