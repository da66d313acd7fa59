"""Old argument names that keep working for one release, with a ``DeprecationWarning``."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

from .errors import PangkasError


def renamed(**old_to_new: str) -> Callable:
    """Decorate a function whose keyword arguments ``old`` are now called ``new``: a call with an
    old name warns and is passed on under the new one; giving both is an error."""
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for old, new in old_to_new.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise PangkasError(f"{fn.__name__}() got both {old}= and {new}=; {old}= is the old name "
                                       f"of {new}=, give only {new}=")
                warnings.warn(f"{fn.__name__}({old}=...) is now {fn.__name__}({new}=...); the old name "
                              "will be removed in the next release", DeprecationWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        wrapper.renamed = dict(old_to_new)  # what the vocabulary test checks
        return wrapper

    return decorate
