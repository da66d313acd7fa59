"""``pangkas.quantize``: int8 on top of pruning, with torchao doing the quantization maths.

pangkas chooses the layers, refuses what cannot work here before touching anything, checks the
result against the unquantized model, and says layer by layer what stayed in floating point.

Schemes:

- ``int8-dynamic``: Linear layers get int8 weights (a scale per output channel) and int8
  activations (scaled per token at run time): transformers and MLPs.
- ``int8-weight-only``: Linear layers get int8 weights; activations stay float.
- ``int8-static``: the model is exported (``torch.export``); convolutions and Linear layers get
  int8 weights and int8 activations whose scales are calibrated on ``data`` (torchao's PT2E flow
  with its x86 inductor quantizer): CNNs. The result is a ``torch.fx.GraphModule``.
- ``int4-weight-only``: only where torchao has an int4 kernel for this machine; refused elsewhere.

On CPU the int8 kernels are only used under ``torch.compile`` (in eager mode each layer
dequantizes and computes in float, which is slower than the float model): measure both.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .distortion import Fidelity
from .errors import PangkasError
from .layers import _batches
from .modules import Selector, select_modules
from .quant_schemes import LINEAR_ONLY, SCHEMES, is_torchao
from .quant_static import build
from .quant_schemes import config as _config
from .quant_schemes import require_torchao as _torchao
from .weights import finalize
from .weights.masks import masked_modules

__all__ = ["SCHEMES", "QuantizeReport", "quantize"]

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class QuantizeReport:
    """What ``quantize`` did: per layer (Linear and conv layers selected), its integer type or why
    it stayed in floating point; ``fidelity``: the mean cosine of the quantized model's outputs to
    the unquantized model's on (up to four of) the calibration batches (nan without ``data``)."""

    scheme: str
    layers: dict[str, str] = field(default_factory=dict)
    fidelity: float = math.nan

    @property
    def quantized(self) -> list[str]:
        return [name for name, how in self.layers.items() if how in ("int8", "int4")]

    @property
    def kept(self) -> dict[str, str]:
        """Layers left in floating point, with the reason."""
        return {name: how for name, how in self.layers.items() if how not in ("int8", "int4")}

    def __str__(self) -> str:
        lines = [f"{self.scheme}: {len(self.quantized)} of {len(self.layers)} layers quantized"
                 + ("" if math.isnan(self.fidelity) else f"; mean cosine to the unquantized model {self.fidelity:.4f}")]
        lines += [f"  left in floating point: {name} ({why})" for name, why in self.kept.items()]
        return "\n".join(lines)


def quantize(model: nn.Module, data: Iterable | None = None, scheme: str = "int8-dynamic", *,
             example_inputs=None, include: Selector = None, exclude: Selector = None) -> tuple[nn.Module, QuantizeReport]:
    """A quantized copy of ``model`` (pruned or not; weight masks are baked in first) and a report.
    ``model`` itself is left as it was.

    ``scheme``: one of ``SCHEMES`` (see the module docstring). ``data``: calibration batches (as
    everywhere: tensors, tuples or dicts the model is called with); ``int8-static`` needs them for
    its activation scales, the others use them only to check the result (``report.fidelity``).
    ``example_inputs``: what ``int8-static`` exports the model with (default the first batch; its
    dim 0 is left dynamic). ``include`` / ``exclude``: which layers may be quantized.
    """
    if scheme not in SCHEMES:
        raise PangkasError(f"unknown scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    batches = _batches(data)
    _torchao()
    candidates = select_modules(model, (nn.Linear, *CONVS), include, exclude)
    if scheme in LINEAR_ONLY:
        quantized, layers = _linear_layers(model, scheme, candidates)
    else:
        quantized, layers = _static(model, batches, example_inputs, candidates)
    report = QuantizeReport(scheme, layers)
    if batches:
        report.fidelity = Fidelity(model, batches[:4])(quantized)
    return quantized, report


def _unmasked_copy(model: nn.Module) -> nn.Module:
    """A copy with pangkas's weight masks baked into the weights (zeros stay zeros in int8)."""
    model = copy.deepcopy(model)
    if any(True for _ in masked_modules(model)):
        finalize(model)
    return model.eval()


def _linear_layers(model: nn.Module, scheme: str, candidates) -> tuple[nn.Module, dict[str, str]]:
    """torchao's ``quantize_`` on the selected Linear layers of a copy."""
    from torchao.quantization import quantize_

    linear = {name for name, m in candidates if isinstance(m, nn.Linear)}
    if not linear:
        raise PangkasError(f"{scheme} quantizes Linear layers and none is selected in {type(model).__name__}; "
                           "for convolutions use scheme='int8-static'")
    # torchao's per-row scales fail on a single input feature (a layer pruning cut down to one)
    narrow = {name for name, m in candidates if isinstance(m, nn.Linear) and m.in_features < 2}
    linear -= narrow
    if scheme == "int4-weight-only":
        _probe_int4()
    quantized = _unmasked_copy(model)
    try:
        quantize_(quantized, _config(scheme), filter_fn=lambda module, name: name in linear)
    except Exception as exc:  # noqa: BLE001 -- the library's own message says which layer and why
        raise PangkasError(f"{scheme} failed in torchao: {exc}") from exc
    bits = "int4" if scheme == "int4-weight-only" else "int8"
    layers = {}
    for name, module in candidates:
        if isinstance(module, CONVS):
            layers[name] = f"{scheme} has no convolution kernel; use int8-static"
        elif name in narrow:
            layers[name] = "one input feature, which torchao cannot quantize"
        else:
            weight = quantized.get_submodule(name).weight
            layers[name] = bits if is_torchao(weight) else "left in floating point by torchao"
    return quantized, layers


def _probe_int4() -> None:
    """Refuse int4 before touching the model where torchao has no int4 kernel for this machine."""
    from torchao.quantization import quantize_

    probe = nn.Sequential(nn.Linear(256, 256)).to(torch.bfloat16)
    try:
        quantize_(probe, _config("int4-weight-only"))
        probe(torch.zeros(1, 256, dtype=torch.bfloat16))
    except Exception as exc:  # noqa: BLE001 -- any failure means: no usable kernel here
        raise PangkasError(f"int4-weight-only is unsupported on this machine by torchao "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no message'}); "
                           "use int8-weight-only") from exc


def _static(model: nn.Module, batches: list, example_inputs, candidates) -> tuple[nn.Module, dict[str, str]]:
    """torchao's PT2E flow (``quant_static.build``) on a copy with the masks baked in."""
    if not batches:
        raise PangkasError("int8-static calibrates activation scales on data=: give calibration batches")
    if not candidates:
        raise PangkasError(f"int8-static quantizes convolutions and Linear layers; none is selected in "
                           f"{type(model).__name__}")
    source = _unmasked_copy(model)
    example = batches[0] if example_inputs is None else example_inputs
    if _batch_size(example) == 1 and any(_batch_size(b) != 1 for b in batches):
        raise PangkasError("example_inputs has batch size 1, which torch.export fixes at 1, and the calibration "
                           "batches are larger: give example_inputs with a batch of at least 2, or none")
    chosen = {name for name, _ in candidates}
    left_out = [name for name, module in source.named_modules()
                if isinstance(module, (nn.Linear, *CONVS)) and name not in chosen]
    quantized = build(source, batches, example, left_out)
    return quantized, _static_layers(quantized, candidates)


def _batch_size(batch) -> int | None:
    """Dim 0 of the first tensor in ``batch``."""
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else [batch]
    return next((v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.ndim), None)


def _static_layers(graph: torch.fx.GraphModule, candidates) -> dict[str, str]:
    """Per selected layer: int8 where the weight its op reads is dequantized from int8."""
    dequantized = set()
    for node in graph.graph.nodes:
        if node.op != "call_function" or len(node.args) < 2 or not isinstance(node.args[1], torch.fx.Node):
            continue
        if "dequantize_per_channel" in str(node.args[1].target) and node.meta.get("nn_module_stack"):
            dequantized.add(list(node.meta["nn_module_stack"].values())[-1][0])
    return {name: "int8" if name in dequantized else "left in floating point by the quantizer"
            for name, _ in candidates}
