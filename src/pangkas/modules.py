"""Navigating a model's module tree: selecting modules by name glob or type (``include=`` /
``exclude=``) and replacing one by name."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterable, Iterator
from typing import Union

from torch import nn

from .errors import PangkasError

Selector = Union[str, type, Iterable[Union[str, type]], None]


def as_patterns(selector: Selector) -> list[str | type]:
    if selector is None:
        return []
    if isinstance(selector, (str, type)):
        return [selector]
    items = list(selector)
    for item in items:
        if not isinstance(item, (str, type)):
            raise PangkasError(
                f"include/exclude entries must be module-name globs or module types, got {item!r}"
            )
    return items


def matches(pattern: str | type, name: str, module: nn.Module) -> bool:
    """A glob matches a module whose name, or any ancestor's name, fits it ("layer1" selects
    everything inside layer1); a type matches instances of it."""
    if isinstance(pattern, type):
        return isinstance(module, pattern)
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


class ModuleFilter:
    """``include`` / ``exclude`` checked against the named modules they choose from: every pattern
    must match one of them, so a typo is an error, not a silent no-op."""

    def __init__(self, include: Selector, exclude: Selector, named: list[tuple[str, nn.Module]], what: str):
        self.includes, self.excludes = as_patterns(include), as_patterns(exclude)
        for label, patterns in (("include", self.includes), ("exclude", self.excludes)):
            for pattern in patterns:
                if not any(matches(pattern, n, m) for n, m in named):
                    shown = pattern.__name__ if isinstance(pattern, type) else repr(pattern)
                    raise PangkasError(f"{label} entry {shown} matches no {what}; names look like "
                                       f"{[n for n, _ in named[:6]]}")

    def excluded(self, name: str, module: nn.Module) -> bool:
        return any(matches(p, name, module) for p in self.excludes)

    def included(self, name: str, module: nn.Module) -> bool:
        return not self.includes or any(matches(p, name, module) for p in self.includes)

    def allows(self, name: str, module: nn.Module) -> bool:
        return self.included(name, module) and not self.excluded(name, module)


def select_modules(
    model: nn.Module,
    kinds: tuple[type, ...],
    include: Selector = None,
    exclude: Selector = None,
) -> list[tuple[str, nn.Module]]:
    """Modules of ``kinds`` that ``include`` selects (everything when None) and ``exclude`` does not."""
    named = list(model.named_modules())
    chosen = ModuleFilter(include, exclude, named, f"module of {type(model).__name__}")
    return [(name, module) for name, module in named
            if isinstance(module, kinds) and chosen.allows(name, module)]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (dotted path) is (``set_submodule`` needs torch 2.5)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode and put every module's train/eval flag back afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
