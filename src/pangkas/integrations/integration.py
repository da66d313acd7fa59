"""What one model family teaches pangkas, as one object, and the set of them one call uses.

The tracer and surgery are generic; a family's modules may need four kinds of knowledge they
cannot derive: which modules are attention (whole heads are the unit), which module classes to
trace as a same-maths subclass whose forward the tracer can follow, how a module's size
attributes follow its cut tensors, and whole-model fixes after surgery (head counts, configs).
Classes of optional libraries are named ``"module.QualName"`` so that nothing imports them early.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from ..errors import PangkasError
from ..graph.adapter import HeadAdapter, Heads
from ..surgery import Undo

Updater = Callable[[nn.Module, dict], None]  # (module, its size attributes before surgery)
Fixer = Callable[[nn.Module, Undo], None]    # records what it changes in the Undo


def _no_attention(model: nn.Module) -> dict[str, Heads]:
    return {}


def _no_splits(model: nn.Module) -> list[str]:
    return []


@dataclass(frozen=True, eq=False)
class Integration:
    """One model family's knowledge (see the module docstring); give it to a call
    (``integrations=[...]``) or to :func:`pangkas.integrations.register`.

    ``attention(model)``: its attention modules by name, with their head counts. ``splits(model)``:
    the names of modules that split a tensor at sizes held in attributes a fixer recomputes from
    the cut (each piece may then lose channels of its own). ``traced_as``:
    class (or ``"module.QualName"``) -> the subclass the tracer runs instead (for a name: a
    function that makes it). ``updaters``: class (or name) -> ``fn(module, original_sizes)``,
    also for subclasses; it may set the size attributes ``surgery.attributes.SIZE_ATTRIBUTES``
    names (undo restores those). ``fixers``: ``fn(model, undo)`` run after every surgery; they
    record anything else they change with ``undo.remember(owner, names)``.
    """

    name: str
    attention: Callable[[nn.Module], dict[str, Heads]] = _no_attention
    splits: Callable[[nn.Module], Iterable[str]] = _no_splits
    traced_as: Mapping[type | str, type | Callable[[], type]] = field(default_factory=dict)
    updaters: Mapping[type | str, Updater] = field(default_factory=dict)
    fixers: Sequence[Fixer] = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise PangkasError(f"an Integration needs a name (a non-empty string), got {self.name!r}")
        for what in ("traced_as", "updaters"):
            table = getattr(self, what)
            if not isinstance(table, Mapping) or not all(
                    isinstance(key, (type, str)) and callable(value) for key, value in table.items()):
                raise PangkasError(f"integration {self.name!r}: {what} must map classes (or "
                                   f"'module.QualName' names) to callables, got {table!r}")
        for cls, form in self.traced_as.items():
            if isinstance(cls, type) and not (isinstance(form, type) and issubclass(form, cls)):
                raise PangkasError(f"integration {self.name!r}: {cls.__name__} must be traced as a "
                                   f"subclass of itself (same parameters, same maths), got {form!r}")
        if not (callable(self.attention) and callable(self.splits) and isinstance(self.fixers, (list, tuple))
                and all(callable(f) for f in self.fixers)):
            raise PangkasError(f"integration {self.name!r}: attention and splits must be functions "
                               "and fixers a list of functions")
        object.__setattr__(self, "fixers", tuple(self.fixers))


def qualname(m: nn.Module) -> str:
    """``m``'s class as ``"module.QualName"``, the form integrations name optional classes by."""
    return f"{type(m).__module__}.{type(m).__qualname__}"


class Subclasses:
    """Same-maths subclasses of an optional library's classes, made the first time one is needed
    (so the library is imported only by models that use it) and found by name when a pickled
    model is loaded: the integration module's ``__getattr__`` returns :meth:`find`. ``names`` maps
    each class (``"module.QualName"``) to its subclass's name; ``body(name, base)`` gives the
    subclass's mixins (placed before ``base``) and namespace; the subclasses live in module ``home``."""

    def __init__(self, home: str, names: Mapping[str, str], body: Callable[[str, type], tuple[tuple, dict]]):
        self.home, self.names, self.body = home, dict(names), body
        self._made: dict[str, type] = {}

    def __call__(self, name: str) -> type:
        """The subclass of the class ``name`` (whose module is already imported)."""
        if name not in self._made:
            module, _, cls_name = name.rpartition(".")
            base = getattr(sys.modules[module], cls_name)
            mixins, namespace = self.body(name, base)
            self._made[name] = type(self.names[name], (*mixins, base), {**namespace, "__module__": self.home})
        return self._made[name]

    def find(self, attr: str) -> type:
        """The subclass called ``attr`` (importing its library), for unpickling."""
        for name, made in self.names.items():
            if attr == made:
                importlib.import_module(name.rpartition(".")[0])
                return self(name)
        raise AttributeError(f"module {self.home!r} has no attribute {attr!r}")

    def base_of(self, cls: type) -> str | None:
        """The class ``cls`` was made from (its name), if it is one of these subclasses."""
        return next((name for name, made in self._made.items() if made is cls), None)

    def traced_as(self) -> dict[str, Callable[[], type]]:
        """An ``Integration.traced_as`` table: each class traced as its subclass."""
        return {name: (lambda name=name: self(name)) for name in self.names}


def _lookup(table: dict, cls: type):
    return table.get(cls) or table.get(f"{cls.__module__}.{cls.__qualname__}")


class Integrations:
    """The integrations one operation uses, asked as one; where two know the same class or
    module, the later one answers (per-call integrations come after the registered ones)."""

    def __init__(self, members: Iterable[Integration]):
        self.members = tuple(members)
        self._traced_as: dict = {}
        self._updaters: dict = {}
        for member in self.members:
            self._traced_as.update(member.traced_as)
            self._updaters.update(member.updaters)

    def adapter(self, model: nn.Module) -> HeadAdapter | None:
        """The tracer's adapter for ``model``'s attention modules and modules whose splits
        follow the cut, if any member knows some."""
        modules: dict[str, Heads] = {}
        following: set[str] = set()
        for member in self.members:
            modules.update(member.attention(model))
            following.update(member.splits(model))
        return HeadAdapter(modules, frozenset(following)) if modules or following else None

    def traced_as(self, cls: type) -> type | None:
        """The subclass the tracer runs in place of exactly ``cls`` (not of its subclasses)."""
        form = _lookup(self._traced_as, cls)
        return form if form is None or isinstance(form, type) else form()

    def updater_for(self, cls: type) -> Updater | None:
        return _lookup(self._updaters, cls)

    def fix(self, model: nn.Module, undo: Undo) -> None:
        for member in self.members:
            for fixer in member.fixers:
                fixer(model, undo)
