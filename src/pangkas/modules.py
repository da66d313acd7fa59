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
    if not any(c in pattern for c in "*?["):  # a plain name (the usual case, and many of them): no glob
        return name == pattern or name.startswith(pattern + ".")
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
    """Run ``model`` in eval mode and put every module's train/eval flag and plain attributes
    back afterwards (see :func:`attributes_kept`)."""
    modes = {m: m.training for m in model.modules()}
    with attributes_kept(model):
        model.eval()
        try:
            yield
        finally:
            for module, training in modes.items():
                module.training = training


_TORCH_OWN = frozenset(vars(nn.Module()))  # registries, hooks, the train flag: kept by their own code


@contextlib.contextmanager
def attributes_kept(model: nn.Module) -> Iterator[None]:
    """Put every module's own attributes back as they were, and the contents of those that are
    dicts or lists: forwards fill caches (timm's ``attention_bias_cache`` keeps biases per
    device, and ``eval()`` replaces it), which must not keep what pangkas's runs put there
    (meta tensors, or tensors of a cut that was undone)."""
    saved = [(m, _own(m), [(v, type(v)(v)) for v in _own(m).values() if type(v) in (dict, list)])
             for m in model.modules()]
    try:
        yield
    finally:
        for module, attributes, contents in saved:
            for name in _own(module).keys() - attributes.keys():
                delattr(module, name)
            for name, value in attributes.items():
                if vars(module).get(name, _MISSING) is not value:
                    vars(module)[name] = value
            for container, items in contents:
                if not _same_items(container, items):
                    container.clear()
                    container.extend(items) if isinstance(container, list) else container.update(items)


_MISSING = object()


def _own(module: nn.Module) -> dict:
    return {n: v for n, v in vars(module).items() if n not in _TORCH_OWN}


def _same_items(container, items) -> bool:
    """Same length and the very same objects (tensors have no plain ==)."""
    if isinstance(container, dict):
        return container.keys() == items.keys() and all(container[k] is items[k] for k in items)
    return len(container) == len(items) and all(a is b for a, b in zip(container, items))
