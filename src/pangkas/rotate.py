"""Hidden-size pruning by rotation (SliceGPT, Ashkboos et al. 2024) for pre-norm RMSNorm decoders.

Index selection (``plan_transformer(hidden=...)``) drops residual-stream coordinates as they are.
This rotates the residual stream first, so that its leading coordinates carry most of what flows
through it, and drops the trailing ones:

1. fold: every RMSNorm's weight goes into the Linears that read it (q/k/v, gate/up, the head), so
   the norms are weightless and commute with an orthogonal ``Q`` (``||x Q|| = ||x||``);
2. rotate: ``Q`` holds the eigenvectors, largest eigenvalue first, of ``X^T X`` summed over the
   inputs of every residual norm (each token scaled to unit RMS, so that every layer counts alike)
   on calibration data, accumulated in float64 without keeping activations. Embeddings ``E -> E Q``,
   Linears writing the residual stream (o_proj, down_proj) ``W -> Q^T W``, Linears reading it
   ``W -> W Q``. This alone changes nothing: the logits are checked against the model's own on the
   example inputs, and a layout that breaks that is refused;
3. slice: keep ``Q``'s first ``d'`` columns. RMSNorm then averages over ``d'`` instead of ``d``;
   norm weights ``sqrt(d/d')`` and ``eps * d/d'`` make it average over ``d`` exactly (the full norm
   of the kept part, the dropped coordinates counted as zero). Qwen3's per-head q/k norms read
   ``rms_norm_eps`` too: q/k projections scaled by ``sqrt(d/d')`` keep them exact.

One ``Q`` for the whole residual stream, not one per layer as in SliceGPT: per-layer rotations need
a new module on every residual connection (SliceGPT's shortcut matrices). With one, the result is
the same architecture with ``hidden_size = d'``, and plain ``from_pretrained`` loads it. Tied
embeddings are untied (the head folds the final norm's weight, the embeddings must not), which adds
``vocab_size * d'`` parameters; the plan and report say so.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import PangkasError
from .inputs import call_model
from .integrations import huggingface
from .integrations.hf_directory import is_transformers
from .layer_importance.states import real_tokens
from .modules import evaluating
from .outputs import primary_tensor
from .progress import track
from .reports import Report
from .surgery import Undo
from .tables import human_count

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
REFUSED = {  # why a family's layout does not commute with a rotation
    "bert": "post-norm: its LayerNorms sit on the residual stream itself",
    "roberta": "post-norm: its LayerNorms sit on the residual stream itself",
    "distilbert": "post-norm: its LayerNorms sit on the residual stream itself",
    "gpt2": "LayerNorm subtracts a mean and adds a bias, which a rotation does not commute with",
    "opt": "LayerNorm subtracts a mean and adds a bias, which a rotation does not commute with",
    "phi": "LayerNorm subtracts a mean and adds a bias, which a rotation does not commute with",
    "gemma": "its RMSNorm scales by (1 + weight) and its embeddings by sqrt(hidden_size)",
    "gemma2": "its RMSNorm scales by (1 + weight) and its embeddings by sqrt(hidden_size)",
    "gemma3": "its RMSNorm scales by (1 + weight) and its embeddings by sqrt(hidden_size)",
}
# Per decoder layer: (residual norm, the Linears reading it, the Linear writing the residual back)
LAYER = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj"),
         ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"))
PER_HEAD_NORMED = (("self_attn.q_norm", "self_attn.q_proj"), ("self_attn.k_norm", "self_attn.k_proj"))
TOLERANCE = 1e-3  # relative error of the rotated (unsliced) logits; float32 rounding is ~1e-6


@dataclass
class Parts:
    """The modules a rotation touches."""

    embeddings: nn.Embedding
    head: nn.Linear
    final_norm: nn.Module
    blocks: list  # per layer: [(norm, readers, writer)]
    per_head: list  # (q_norm/k_norm, the projection it reads)

    @property
    def norms(self) -> list[nn.Module]:
        return [norm for block in self.blocks for norm, _, _ in block] + [self.final_norm]

    @property
    def tied(self) -> bool:
        return self.head.weight is self.embeddings.weight


def parts_of(model: nn.Module) -> Parts:
    """The layout of a supported model, or a PangkasError saying why it is not one."""
    if not is_transformers(model):
        raise PangkasError(f"{type(model).__name__} is not a Hugging Face transformers model: rotation "
                           "needs a LLaMA-style decoder (LLaMA, Mistral, Qwen2, Qwen3)")
    kind = getattr(model.config, "model_type", None)
    if kind not in SUPPORTED:
        why = REFUSED.get(kind, "pangkas knows the layout of LLaMA, Mistral, Qwen2 and Qwen3 only")
        raise PangkasError(f"rotate=True cannot rotate {type(model).__name__} ({kind}): {why}; prune hidden= "
                           "without rotate= (index selection)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "model", None)
    if not isinstance(head, nn.Linear) or base is None:
        raise PangkasError(f"rotate=True needs a model with its language-model head ({kind}ForCausalLM): the "
                           f"final norm's output of {type(model).__name__} is the output itself, and rotating "
                           "it would change it")
    try:
        blocks = [[(layer.get_submodule(norm), [layer.get_submodule(r) for r in readers], layer.get_submodule(writer))
                   for norm, readers, writer in LAYER] for layer in base.layers]
        per_head = [(layer.get_submodule(n), layer.get_submodule(p)) for layer in base.layers
                    for n, p in PER_HEAD_NORMED if _has(layer, n)]
        parts = Parts(base.embed_tokens, head, base.norm, blocks, per_head)
    except AttributeError as exc:
        raise PangkasError(f"{type(model).__name__} does not have the LLaMA layout rotate=True needs ({exc})") from exc
    linears = [m for block in blocks for _, readers, writer in block for m in (*readers, writer)] + [head]
    if any(not isinstance(m, nn.Linear) for m in linears):
        raise PangkasError("rotate=True needs plain nn.Linear projections (not quantized or replaced ones)")
    if any(not isinstance(getattr(n, "variance_epsilon", None), float) for n in parts.norms):
        raise PangkasError(f"the norms of {type(model).__name__} are not the RMSNorm rotate=True knows "
                           "(weight * x / sqrt(mean(x^2) + variance_epsilon))")
    touched = [parts.embeddings, *linears, *parts.norms]
    if any(parametrize.is_parametrized(m) for m in touched):
        raise PangkasError("rotate=True mixes every weight of the residual stream, which would destroy weight "
                           "masks: finalize or remove them first, or prune weights after rotating")
    return parts


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


# -- statistics ------------------------------------------------------------------------------

@torch.no_grad()
def residual_covariance(model: nn.Module, parts: Parts, data) -> torch.Tensor:
    """``sum X^T X`` (float64) of every residual norm's inputs over ``data``, each token scaled to
    unit RMS; padding (``attention_mask == 0`` in dict batches) left out."""
    batches = list(data) if data is not None else []
    if not batches:
        raise PangkasError("rotate=True needs calibration batches to find the rotation: give data=")
    width = parts.embeddings.embedding_dim
    gram = torch.zeros(width, width, dtype=torch.float64)
    current: dict = {}

    def add(module, args):
        keep = real_tokens(current["batch"], args[0])
        rows = args[0].detach().double().reshape(-1, width)
        rows = rows if keep is None else rows[keep]
        rows = rows / rows.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
        gram.add_((rows.T @ rows).cpu())

    hooks = [norm.register_forward_pre_hook(add) for norm in parts.norms]
    try:
        with evaluating(model):
            for batch in track(batches, "rotation: residual-stream statistics"):
                current["batch"] = batch
                call_model(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    return gram


def principal_directions(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns, in that order) of ``gram``."""
    values, vectors = torch.linalg.eigh(gram)
    return values.flip(0), vectors.flip(1)


# -- the new weights -------------------------------------------------------------------------

def rotated(parts: Parts, original: dict, q: torch.Tensor) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
    """The new value of every residual-stream tensor for the rotation ``q`` (``d x d``), computed
    in float64 from its ``original`` value (by parameter), one at a time: norms folded into their
    readers (and left as ones), embeddings ``E Q``, readers ``W Q``, writers ``Q^T W``."""

    def cast(p, value):
        return p, value.to(original[p].dtype)

    def read(linear, norm):  # W -> W diag(w) Q
        return cast(linear.weight, (original[linear.weight].double() * original[norm.weight].double()) @ q)

    yield cast(parts.embeddings.weight, original[parts.embeddings.weight].double() @ q)
    for block in parts.blocks:
        for norm, readers, writer in block:
            yield from (read(r, norm) for r in readers)
            yield cast(writer.weight, q.T @ original[writer.weight].double())
            if writer.bias is not None:
                yield cast(writer.bias, q.T @ original[writer.bias].double())
    yield read(parts.head, parts.final_norm)
    for norm in parts.norms:
        yield norm.weight, torch.ones_like(original[norm.weight])


def sliced(parts: Parts, kept: int) -> dict[nn.Parameter, torch.Tensor]:
    """The new values (by parameter) of the residual-stream tensors when the rotated model keeps
    its first ``kept`` directions, with the norm compensation (see the module docstring)."""
    scale = math.sqrt(parts.embeddings.embedding_dim / kept)
    new = {p: p.data.narrow(dim, 0, kept).contiguous() for p, dim in residual_dims(parts)}
    for norm in parts.norms:
        new[norm.weight] = torch.full((kept,), scale, dtype=norm.weight.dtype)
    for _, proj in parts.per_head:  # read by a per-head norm, whose eps (the config's) is scaled too
        for p in (proj.weight, proj.bias):
            if p is not None:
                new[p] = new.get(p, p.data) * scale
    return new


def residual_dims(parts: Parts) -> list[tuple[nn.Parameter, int]]:
    """The tensors with a dim of the residual stream's width, with that dim (readers' biases have
    none; norms are set, not cut)."""
    readers = [r for block in parts.blocks for _, rs, _ in block for r in rs] + [parts.head]
    writers = [w for block in parts.blocks for _, _, w in block]
    return ([(parts.embeddings.weight, 1)] + [(r.weight, 1) for r in readers] + [(w.weight, 0) for w in writers]
            + [(w.bias, 0) for w in writers if w.bias is not None])


def changed_tensors(parts: Parts) -> list[nn.Parameter]:
    """Every tensor rotating and slicing gives a new value."""
    per_head = [p for _, proj in parts.per_head for p in (proj.weight, proj.bias) if p is not None]
    return [p for p, _ in residual_dims(parts)] + [n.weight for n in parts.norms] + per_head


# -- plan, apply, report ---------------------------------------------------------------------

class RotationPlan:
    """What ``plan_transformer(..., hidden=, rotate=True)`` would do; nothing changes until
    :meth:`apply`. ``eigenvalues`` (descending) are the residual stream's energy per rotated
    direction; ``kept`` directions stay."""

    def __init__(self, model: nn.Module, example_inputs, hidden: float, q: torch.Tensor, eigenvalues: torch.Tensor):
        self.model, self.example_inputs, self.hidden = model, example_inputs, hidden
        self.q, self.eigenvalues = q, eigenvalues
        self.width = q.shape[0]
        self.heads = getattr(model.config, "num_attention_heads", None) or 1
        self.kept = kept_width(self.width, hidden, self.heads)
        self.parts = parts_of(model)
        self.untie = self.parts.tied
        self.params_before = sum(p.numel() for p in model.parameters())
        self.params_after = self._params_after()
        self.applied = False

    @property
    def energy_kept(self) -> float:
        """The share of the calibration residual stream's energy (sum of squares) the kept
        directions carry."""
        values = self.eigenvalues.clamp_min(0)
        return float(values[:self.kept].sum() / values.sum().clamp_min(1e-300))

    @property
    def params_added(self) -> int:
        """Parameters untying the embeddings adds (0 for an untied model)."""
        return self.parts.head.weight.shape[0] * self.kept if self.untie else 0

    def _params_after(self) -> int:
        """Every tensor of the residual stream has one dim of width ``d``, which becomes ``d'``."""
        tensors = [p for p, _ in residual_dims(self.parts)] + [n.weight for n in self.parts.norms]
        touched = {id(p): p.numel() for p in tensors}.values()  # a tied one once
        return self.params_before - sum(n // self.width * (self.width - self.kept) for n in touched) \
            + self.params_added

    def __str__(self) -> str:
        lines = [f"rotation plan: hidden {self.width} -> {self.kept} (hidden={self.hidden}, removes "
                 f"{(self.width - self.kept) / self.width:.3g}: a multiple of the {self.heads} attention heads, as "
                 "the config requires), one orthogonal rotation of the residual stream "
                 f"(PCA on calibration data) keeps {self.energy_kept:.2%} of its energy",
                 f"params {human_count(self.params_before)} -> {human_count(self.params_after)}"]
        if self.untie:
            lines.append(f"tied embeddings untied: the head folds the final norm's weight (+{human_count(self.params_added)} "
                         "params, counted above)")
        return "\n".join(lines)

    def apply(self) -> RotationReport:
        """Fold, rotate (checked exact on the example inputs), slice and update the config;
        transactional: on any error the model is left as it was."""
        if self.applied:
            raise PangkasError("this rotation plan was already applied; plan again")
        if self.parts.embeddings.embedding_dim != self.width:
            raise PangkasError("the model's hidden size changed since this plan was made; plan again")
        undo = Undo()
        try:
            _apply(self, undo)
        except BaseException:
            undo.restore()
            raise
        self.applied = True
        problem = huggingface.config_warning(self.model)
        if problem:
            warnings.warn(problem, stacklevel=2)
        return RotationReport(self)


def _apply(plan: RotationPlan, undo: Undo) -> None:
    model, parts = plan.model, plan.parts
    expected = _logits(model, plan.example_inputs)
    if plan.untie:  # the head becomes its own parameter; the config must say so to save and load
        undo.remember(parts.head, ["weight"])
        undo.remember(model.config, ["tie_word_embeddings"])
        parts.head.weight = nn.Parameter(parts.head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    original = {p: p.data for p in changed_tensors(parts)}
    for p, data in original.items():
        undo.tensors.append((p, data))
    for p, value in rotated(parts, original, plan.q):  # all directions: must change nothing
        p.data = value
    error = _relative_error(_logits(model, plan.example_inputs), expected)
    if not error <= TOLERANCE:
        raise PangkasError(f"rotating {type(model).__name__} changed its outputs (relative error {error:.2g}): its "
                           "layout is not the LLaMA one rotate=True assumes; prune hidden= without rotate=")
    for p, value in sliced(parts, plan.kept).items():
        p.data = value
    _resize(model, parts, plan.width, plan.kept, undo)
    _logits(model, plan.example_inputs)  # the sliced model runs


def _resize(model: nn.Module, parts: Parts, width: int, kept: int, undo: Undo) -> None:
    """Module attributes and the config follow the new hidden size; eps scales by d/d'."""
    ratio = width / kept
    for module in model.modules():
        if isinstance(module, nn.Linear):
            undo.remember(module, ["in_features", "out_features"])
            module.out_features, module.in_features = module.weight.shape
        elif getattr(module, "hidden_size", None) == width:  # decoder layers keep config.hidden_size
            undo.remember(module, ["hidden_size"])
            module.hidden_size = kept
    undo.remember(parts.embeddings, ["embedding_dim"])
    parts.embeddings.embedding_dim = kept
    for norm in parts.norms + [n for n, _ in parts.per_head]:
        undo.remember(norm, ["variance_epsilon"])
        norm.variance_epsilon = norm.variance_epsilon * ratio
    config = model.config
    undo.remember(config, ["hidden_size", "head_dim", "rms_norm_eps"])
    if not hasattr(config, "head_dim"):
        undo.added.append((config, "head_dim"))
    head_dim = _head_dim(model)
    config.hidden_size = kept
    if head_dim is not None:
        config.head_dim = head_dim  # LLaMA-style configs derive it from hidden_size when absent
    config.rms_norm_eps = config.rms_norm_eps * ratio


def _head_dim(model: nn.Module) -> int | None:
    layers = model.model.layers
    return getattr(layers[0].self_attn, "head_dim", None) if len(layers) else None


@torch.no_grad()
def _logits(model: nn.Module, example_inputs) -> torch.Tensor:
    with evaluating(model):
        out = call_model(model, example_inputs)
    return primary_tensor(out).detach().double()


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm().clamp_min(1e-12))


@dataclass
class RotationReport(Report):
    """What a rotation did: sizes, the energy kept, whether embeddings were untied."""

    plan: RotationPlan
    kind = "rotation"

    def __post_init__(self):
        self.params_before = self.plan.params_before
        self.params_after = sum(p.numel() for p in self.plan.model.parameters())
        self.macs_before = self.macs_after = None

    def details(self) -> dict:
        plan = self.plan
        return {"hidden_before": plan.width, "hidden_after": plan.kept, "energy_kept": plan.energy_kept,
                "untied": plan.untie, "params_added_by_untying": plan.params_added}

    def __str__(self) -> str:
        return str(self.plan).replace("rotation plan", "rotated and sliced", 1)


def kept_width(width: int, hidden: float, heads: int) -> int:
    """The hidden size left: ``hidden`` of ``width`` removed, rounded to the nearest multiple of
    ``heads`` (LLaMA-style configs refuse a hidden_size that is not one, so plain
    ``from_pretrained`` could not load the result), at least one multiple."""
    return max(heads, heads * math.floor((width - hidden * width) / heads + 0.5))


def plan_rotation(model: nn.Module, example_inputs, hidden: float, data) -> RotationPlan:
    """The rotation and how much of it is kept (see the module docstring); the model is unchanged."""
    if not (isinstance(hidden, (int, float)) and 0 <= hidden < 1):
        raise PangkasError(f"hidden must be a fraction in [0, 1), got {hidden!r}")
    parts = parts_of(model)
    width = parts.embeddings.embedding_dim
    values, vectors = principal_directions(residual_covariance(model, parts, data))
    return RotationPlan(model, example_inputs, hidden, vectors, values)
