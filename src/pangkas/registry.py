"""Named extension objects of one kind, filled by explicit ``register`` calls (no import magic)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import PangkasError

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects of one ``kind`` by their ``name`` attribute; a name is taken once unless replaced.

    ``from_function`` (optional) turns a plain function into an object of the kind, so that an
    argument may be a function too; ``signature`` says what that function looks like.
    """

    def __init__(self, kind: str, base: type, from_function: Callable[[Callable], T] | None = None,
                 signature: str = ""):
        self.kind, self.base = kind, base
        self.from_function, self.signature = from_function, signature
        self._items: dict[str, T] = {}

    def resolve(self, value, argument: str = "importance") -> T:
        """The object ``value`` is or names: an instance of the base class, a registered name, or
        a plain function (when the kind takes them)."""
        if isinstance(value, self.base):
            return value
        if isinstance(value, str) and value in self._items:
            return self._items[value]
        if isinstance(value, type) and issubclass(value, self.base):
            raise PangkasError(f"{argument}= takes an instance: {argument}={value.__name__}()")
        if self.from_function is not None and callable(value) and not isinstance(value, (str, type)):
            return self.from_function(value)
        function = f" or a function {self.signature}" if self.from_function is not None else ""
        raise PangkasError(f"{argument} must be one of {list(self.names())} (the registered names), a "
                           f"{self.base.__name__} object{function}, got {value!r}")

    def register(self, item: T, *, replace: bool = False) -> T:
        """Add ``item`` under ``item.name``; a second object of the same name is refused unless
        ``replace=True`` (a silent override would change results far from its cause)."""
        if not isinstance(item, self.base):
            hint = f" (an instance: {item.__name__}())" if isinstance(item, type) else ""
            raise PangkasError(f"a {self.kind} must be a {self.base.__name__} object{hint}, got {item!r}")
        name = getattr(item, "name", None)
        if not isinstance(name, str) or not name:
            raise PangkasError(f"a {self.kind} needs a name (a non-empty string), got {name!r}")
        if name in self._items and not replace:
            raise PangkasError(f"a {self.kind} named {name!r} is already registered "
                               f"({self._items[name]!r}); pass replace=True to replace it")
        self._items[name] = item
        return item

    def unregister(self, name: str) -> T:
        """Remove and return the object registered as ``name``."""
        if name not in self._items:
            raise PangkasError(f"no {self.kind} named {name!r} is registered; registered: {list(self._items)}")
        return self._items.pop(name)

    def get(self, name: str) -> T | None:
        return self._items.get(name)

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
