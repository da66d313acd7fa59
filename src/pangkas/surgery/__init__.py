"""Physical surgery: cut tensors down to the kept positions and fix the modules' attributes.

Every change is recorded so ``Undo.restore()`` puts the model back exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .attributes import Updater, snapshot, update


@dataclass
class Undo:
    tensors: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    attributes: list[tuple[object, dict]] = field(default_factory=list)
    added: list[tuple[object, str]] = field(default_factory=list)  # attributes to delete again
    kept: dict[int, list] = field(default_factory=dict)  # id(cut tensor) -> its kept positions per dim

    def remember(self, owner: object, names) -> None:
        """Record ``owner``'s current values of ``names`` (those it has) before changing them."""
        self.attributes.append((owner, {n: getattr(owner, n) for n in names if hasattr(owner, n)}))

    def restore(self) -> None:
        for tensor, data in self.tensors:
            tensor.data = data
        for owner, values in reversed(self.attributes):
            for name, value in values.items():
                setattr(owner, name, value)
        for owner, name in self.added:
            vars(owner).pop(name, None)


def owners(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Each parameter/buffer name -> (owning module, attribute name)."""
    found = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for kind in (module._parameters, module._buffers):
            for attr, tensor in kind.items():
                if tensor is not None:
                    found.setdefault(prefix + attr, (module, attr))
    return found


def _modules_of(model: nn.Module, name: str, owner: nn.Module) -> list[nn.Module]:
    """The owner of a tensor, and for a parametrized tensor (``conv.parametrizations.weight.
    original``) also the module it parametrizes, whose attributes describe its shape."""
    if ".parametrizations." in f".{name}":
        prefix = f".{name}".split(".parametrizations.")[0][1:]
        return [owner, model.get_submodule(prefix)]
    return [owner]


def _cut_per_block(cut: torch.Tensor, dim: int, index: torch.Tensor, rows: int,
                   kept_rows: torch.Tensor | None) -> torch.Tensor:
    """Keep ``index[b]`` along ``dim`` in row-block b of dim 0 (``rows`` rows before the cut, in
    ``index.shape[0]`` equal blocks; ``kept_rows`` the rows kept of them, None: all)."""
    block = torch.arange(rows, device=cut.device) // (rows // index.shape[0])
    if kept_rows is not None:
        block = block[kept_rows.to(cut.device)]
    chosen = index[block]  # (rows kept, k)
    shape = [chosen.shape[0]] + [1] * (cut.ndim - 1)
    shape[dim] = chosen.shape[1]
    sizes = list(cut.shape)
    sizes[dim] = chosen.shape[1]
    return cut.gather(dim, chosen.reshape(shape).expand(sizes))


def cut(data: torch.Tensor, per_dim: list[torch.Tensor | None]) -> torch.Tensor:
    """``data`` at the positions ``per_dim`` keeps (see ``shrink``)."""
    result = data
    for dim, index in enumerate(per_dim):
        if index is not None and index.ndim == 2:
            result = _cut_per_block(result, dim, index.to(result.device), data.shape[0], per_dim[0])
        elif index is not None:
            result = result.index_select(dim, index.to(result.device))
    return result


@torch.no_grad()
def shrink(model: nn.Module, keep: dict[str, list[torch.Tensor | None]],
           updater_for: Callable[[type], Updater | None] | None = None,
           fix: Callable[[nn.Module, Undo], None] | None = None) -> Undo:
    """Keep only the positions ``keep[name][dim]`` (None: the whole dim) of each named tensor.

    Tensors are cut in place (``.data``), so Parameter objects, ties between modules and the
    list ``model.parameters()`` stay valid; optimizers holding the old shapes must be rebuilt.
    What the model's families know comes from its integrations (``integrations.Integrations``):
    ``updater_for(cls)`` updates a class's size attributes where torch's own updaters do not,
    and ``fix(model, undo)`` makes whole-model fixes (head counts, configs), recorded in ``undo``.
    """
    undo = Undo()
    where = owners(model)
    touched: dict[int, nn.Module] = {}
    try:
        for name, per_dim in keep.items():
            module, attr = where[name]
            tensor = module._parameters.get(attr)
            tensor = tensor if tensor is not None else module._buffers[attr]
            for m in _modules_of(model, name, module):
                if id(m) not in touched:
                    touched[id(m)] = m
                    undo.attributes.append((m, snapshot(m)))
            data = tensor.data
            undo.tensors.append((tensor, data))
            undo.kept[id(tensor)] = per_dim
            tensor.data = cut(data, per_dim).contiguous()
        for module, original in list(undo.attributes):
            update(module, original, updater_for)
        if fix is not None:
            fix(model, undo)
    except BaseException:  # an interrupt too: never leave a model half cut
        undo.restore()
        raise
    return undo
