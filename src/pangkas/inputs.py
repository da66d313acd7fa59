"""The one calling convention for example inputs and calibration batches.

A batch is a tensor (``model(batch)``), a tuple or list (``model(*batch)``) or a dict
(``model(**batch)``, the Hugging Face way).

pangkas never generates, so a model that keeps a key/value cache (``config.use_cache``, on by
default in Hugging Face causal LMs) runs without one: a cache would only cost time, and where a
layer is run twice on the same captured arguments (statistics, then the next block's inputs) the
second call would read the keys the first one cached.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .errors import PangkasError


@contextmanager
def without_cache(model: nn.Module) -> Iterator[None]:
    """``model.config.use_cache`` off while inside (restored after)."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None) is not True:
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model`` called on ``batch`` (see the module docstring), without a key/value cache."""
    if isinstance(batch, dict) and batch.get("use_cache"):
        batch = {**batch, "use_cache": False}
    with without_cache(model):
        return _call(model, batch)


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, dict):
        return model(**batch)
    raise PangkasError(
        f"a batch must be a tensor, a tuple/list of model arguments or a dict of keyword arguments, "
        f"got {type(batch).__name__}"
    )


def export_call(model: nn.Module, batch: Any, *, sequences: bool = False) -> tuple[tuple, dict, tuple | dict]:
    """``torch.export``'s view of calling ``model`` on ``batch``: (args, kwargs, dynamic_shapes),
    with dim 0 of every tensor input dynamic (later batches may differ in size); with
    ``sequences``, every dim of integer and bool inputs too (token ids and masks vary in length)."""
    if isinstance(batch, torch.Tensor):
        args, kwargs = (batch,), {}
    elif isinstance(batch, (tuple, list)):
        args, kwargs = tuple(batch), {}
    elif isinstance(batch, dict):
        args, kwargs = (), dict(batch)
    else:
        _call(model, batch)  # raises the one error for a batch of the wrong kind
    def dynamic(value):
        if not isinstance(value, torch.Tensor):
            return None
        tokens = sequences and value.ndim > 1 and not (value.is_floating_point() or value.is_complex())
        return dict.fromkeys(range(value.ndim) if tokens else (0,), torch.export.Dim.AUTO)

    if not kwargs:
        return args, kwargs, tuple(dynamic(a) for a in args)
    names = list(inspect.signature(model.forward).parameters)  # export wants them by name then
    return args, kwargs, {**{n: dynamic(a) for n, a in zip(names, args)}, **{k: dynamic(v) for k, v in kwargs.items()}}
