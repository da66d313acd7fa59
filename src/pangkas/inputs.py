"""The one calling convention for example inputs and calibration batches.

A batch is a tensor (``model(batch)``), a tuple or list (``model(*batch)``) or a dict
(``model(**batch)``, the Hugging Face way).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import PangkasError


def call_model(model: nn.Module, batch: Any) -> Any:
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
