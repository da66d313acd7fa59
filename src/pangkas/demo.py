"""The demo: a small CNN trained on scikit-learn's bundled handwritten digits (real data, no
download), then pruned step by step with a short fine-tune after each step, every stage measured.

``digits_cnn`` is importable as a factory (``pangkas.demo:digits_cnn``) for the CLI.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .errors import PangkasError
from .export import OnnxRuntimeModule, onnx_bytes
from .files import check_directory_target, pyplot, staged_directory, write_figure
from .io import save
from .measure import Ratio, file_sizes, latency_ratios, measure
from .progress import track
from .tables import human_count, render_table
from .channels import prune_channels
from .layers import prune_layers
from .quantize import quantize
from .recover import recover
from .weights import finalize, prune_weights

SPARSITIES = (0.5, 0.8, 0.9, 0.95)
CHANNEL_RATIO = 0.5
LAYERS_REMOVED = 1
# Lets `pangkas measure digits_cnn_pruned.safetensors` rebuild the architecture.
MODEL_METADATA = {"source": "pangkas.demo:digits_cnn", "input_shape": "[1, 1, 8, 8]"}


def digits_cnn(num_classes: int = 10) -> nn.Sequential:
    """A compact CNN for 1x8x8 digit images (about 0.1M parameters)."""

    def block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

    return nn.Sequential(
        block(1, 32), block(32, 32), nn.MaxPool2d(2),          # 8x8 -> 4x4
        block(32, 64), block(64, 64), nn.MaxPool2d(2),         # 4x4 -> 2x2
        nn.Flatten(), nn.Linear(64 * 2 * 2, 128), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(128, num_classes),
    )


@dataclass(frozen=True)
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(seed: int = 0) -> Digits:
    """scikit-learn's 1,797 digits as 1x8x8 float images in [0, 1]; fixed stratified 75/25 split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise PangkasError("the demo needs scikit-learn: pip install 'pangkas[demo]'") from exc
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.25, random_state=seed, stratify=y.numpy()
    )
    return Digits(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


def train(model: nn.Module, data: Digits, epochs: int, lr: float = 2e-3, desc: str = "training",
          seed: int = 0) -> None:
    """Adam with cross-entropy and a cosine schedule; a fresh optimizer each call."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = -(-len(data.y_train) // 64)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    model.train()
    for _ in track(range(epochs), desc):
        order = torch.randperm(len(data.y_train), generator=generator)
        for batch in order.split(64):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


@dataclass(frozen=True)
class Stage:
    kind: str  # dense, weights, channels, layers, pipeline, onnxruntime, int8
    name: str
    sparsity: float
    accuracy: float
    params: int
    nonzero: int
    macs: int
    file_bytes: int
    latency: Ratio | None = None  # vs the dense model; only for the models that get deployed
    file_note: str = ""  # which file, where it is not pangkas.save's

    @property
    def latency_ratio(self) -> float | None:
        return None if self.latency is None else self.latency.value


def _stage(kind: str, name: str, model: nn.Module, data: Digits) -> Stage:
    m = measure(model, data.x_test, latency=False)
    return Stage(kind, name, m.sparsity, accuracy(model, data.x_test, data.y_test), m.params,
                 m.nonzero_params, m.macs, m.file_bytes_compressed)


@dataclass
class _Run:
    """What every stage of one demo run shares."""

    data: Digits
    teacher: nn.Module
    finetune: int
    seed: int
    stages: list[Stage]
    deployable: dict[int, nn.Module]

    def record(self, kind: str, name: str, model: nn.Module, deploy: bool = False) -> None:
        self.stages.append(_stage(kind, name, model, self.data))
        if deploy:  # what gets deployed: masks folded into plain zeros
            self.deployable[len(self.stages) - 1] = finalize(copy.deepcopy(model))

    def distil(self, model: nn.Module, desc: str) -> None:
        """Recover by distillation from the dense model plus the labels (half each)."""
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(self.data.y_train), generator=generator)
        batches = [(self.data.x_train[i], self.data.y_train[i]) for i in order.split(64)]
        recover(model, batches, teacher=self.teacher, alpha=0.5, temperature=4.0, epochs=self.finetune,
                lr=1e-3, inputs=lambda batch: batch[0],
                loss_fn=lambda output, batch: nn.functional.cross_entropy(output, batch[1]))


def _weight_stages(run: _Run, model: nn.Module) -> None:
    """Global magnitude pruning to each sparsity, recovered after each."""
    for sparsity in SPARSITIES:
        prune_weights(model, sparsity=sparsity, scope="global")
        run.record("weights", f"pruned {sparsity:.0%} no finetune", model)
        run.distil(model, f"recovering at {sparsity:.0%}")
        run.record("weights", f"weights {sparsity:.0%}", model, deploy=True)


def _calibration(run: _Run) -> list:
    """512 training images in batches: what channel pruning measures and re-fits on."""
    return list(run.data.x_train[:512].split(128))


def _channel_stages(run: _Run, model: nn.Module) -> None:
    """Half of every layer's channels physically removed, the layers reading them re-fitted on
    training images (structured OBS + reconstruction: no fine-tuning needed), then recovered."""
    prune_channels(model, run.data.x_test[:2], ratio=CHANNEL_RATIO, data=_calibration(run), reconstruct=True)
    run.record("channels", f"pruned channels {CHANNEL_RATIO:.0%} no finetune", model)
    run.distil(model, "recovering the thinner model")
    run.record("channels", f"channels {CHANNEL_RATIO:.0%}", model, deploy=True)


def _layer_stages(run: _Run, model: nn.Module) -> None:
    """The block that changes its input least on training images (block influence) goes."""
    prune_layers(model, list(run.data.x_train.split(128)), n=LAYERS_REMOVED, importance="block_influence")
    run.record("layers", f"pruned {LAYERS_REMOVED} block no finetune", model)
    run.distil(model, "recovering the shallower model")
    run.record("layers", f"layers -{LAYERS_REMOVED}", model, deploy=True)


def _pipeline_stages(run: _Run, model: nn.Module) -> None:
    """All three, in the order that removes the most compute first: a block, half the channels,
    then half the remaining weights; one recovery at the end."""
    prune_layers(model, list(run.data.x_train.split(128)), n=LAYERS_REMOVED, importance="block_influence")
    prune_channels(model, run.data.x_test[:2], ratio=CHANNEL_RATIO, data=_calibration(run), reconstruct=True)
    prune_weights(model, sparsity=0.5, scope="global")
    run.record("pipeline", "pipeline no finetune", model)
    run.distil(model, "recovering the pipeline's model")
    run.record("pipeline", "pipeline: layers, channels, weights", model, deploy=True)


def _onnxruntime_stages(run: _Run, model: nn.Module) -> tuple[nn.Module, bytes] | None:
    """The pipeline's recovered model as the ONNX files onnxruntime runs, scored and timed there:
    in float (what the runtime alone changes), then with int8 weights and activations (scales
    calibrated on training images). Returns the int8 model and its .onnx file, or None (with a
    warning) where torchao, onnx or onnxruntime is not installed."""
    example = run.data.x_train[:64]
    try:
        float_file, _, _ = onnx_bytes(model, example)
        int8_model = quantize(model, _calibration(run), "int8-static")[0]
        int8_file, _, _ = onnx_bytes(int8_model, example)
    except PangkasError as exc:
        warnings.warn(f"demo: no onnxruntime stages: {exc}", stacklevel=2)
        return None
    # the int8 row's file is pangkas.save's (sparse int8); the .onnx stores its int8 weights densely
    files = {"onnxruntime": (len(float_file), ".onnx"),
             "int8": (file_sizes(int8_model)[1], f".onnx {len(int8_file) / 1024:.1f} KiB")}
    for kind, name, data in (("onnxruntime", "pipeline (onnxruntime)", float_file),
                             ("int8", "pipeline + int8 (onnxruntime)", int8_file)):
        runtime = OnnxRuntimeModule(data)
        structure = _stage(kind, name, model, run.data)  # the same layers, in another runtime or in int8
        run.stages.append(replace(structure, accuracy=accuracy(runtime, run.data.x_test, run.data.y_test),
                                  file_bytes=files[kind][0], file_note=files[kind][1]))
        run.deployable[len(run.stages) - 1] = runtime
    return int8_model, int8_file


def run_demo(out: str | Path = "demo-output", *, quick: bool = False, seed: int = 0,
             overwrite: bool = False) -> list[Stage]:
    """Train a digits CNN, then, each from the trained model: (1) prune weights to each of
    ``SPARSITIES``, (2) remove half the channels, (3) remove a block, (4) all three; each is
    recovered by distillation from the trained model; (5) the last one run by onnxruntime, in
    float and in int8.

    Writes the pruned models (``digits_cnn_pruned.safetensors`` with its masks,
    ``digits_cnn_channels.safetensors``, ``digits_cnn_layers.safetensors``,
    ``digits_cnn_pipeline.safetensors``, ``digits_cnn_pipeline_int8.safetensors`` and ``.onnx``),
    ``results.md``, ``weights.png`` and ``pipeline.png``
    to ``out``. A non-empty ``out`` is refused unless ``overwrite=True``, and then only these
    files are replaced.
    """
    out = check_directory_target(out, overwrite=overwrite)  # before minutes of training
    torch.manual_seed(seed)
    data = load_digits_split(seed)
    model = digits_cnn()
    epochs, finetune = (3, 1) if quick else (40, 8)
    start = time.perf_counter()
    train(model, data, epochs, desc="training", seed=seed)
    run = _Run(data, copy.deepcopy(model).eval(), finetune, seed, [], {})
    run.record("dense", "dense", model, deploy=True)
    variants = {name: copy.deepcopy(model) for name in ("weights", "channels", "layers", "pipeline")}
    _weight_stages(run, variants["weights"])
    _channel_stages(run, variants["channels"])
    _layer_stages(run, variants["layers"])
    _pipeline_stages(run, variants["pipeline"])
    int8 = _onnxruntime_stages(run, variants["pipeline"])
    ratios = latency_ratios(list(run.deployable.values()), data.x_test, rounds=6 if quick else 12,
                            min_run_time=0.05 if quick else 0.15)
    stages = run.stages
    for index, ratio in zip(run.deployable, ratios):
        stages[index] = replace(stages[index], latency=ratio)
    names = {"weights": "pruned", "channels": "channels", "layers": "layers", "pipeline": "pipeline"}
    table = results_table(stages, time.perf_counter() - start)
    with staged_directory(out, overwrite=overwrite) as staging:
        for kind, variant in variants.items():
            save(variant, staging / f"digits_cnn_{names[kind]}.safetensors", metadata=MODEL_METADATA)
        if int8 is not None:
            save(int8[0], staging / "digits_cnn_pipeline_int8.safetensors", metadata=MODEL_METADATA)
            (staging / "digits_cnn_pipeline_int8.onnx").write_bytes(int8[1])
        (staging / "results.md").write_text(f"{table}\n\nReproduce: `pangkas demo --out {out} --overwrite`\n")
        plot([s for s in stages if s.kind in ("dense", "weights")], staging / "weights.png")
        plot_pipeline(stages, staging / "pipeline.png")
    return stages


def _latency_cell(stage: Stage, dense: Stage) -> str:
    if stage.latency is None:
        return ""
    return "1.00x (baseline)" if stage is dense else str(stage.latency)


def results_table(stages: list[Stage], seconds: float) -> str:
    rows = [(s.name, f"{s.sparsity:.1%}", f"{s.accuracy:.2%}", f"{s.params:,}", f"{s.nonzero:,}",
             human_count(s.macs), f"{s.file_bytes / 1024:.1f} KiB" + (f" ({s.file_note})" if s.file_note else ""),
             _latency_cell(s, stages[0]))
            for s in stages]
    return render_table(
        f"digits CNN: weight pruning (global magnitude), channel pruning (OBS + reconstruction), layer pruning "
        f"(block influence) and all three, each recovered by distillation; the last one also run by onnxruntime, "
        f"in float and in int8 (static); {seconds:.0f} s, {torch.get_num_threads()} threads",
        ("stage", "model sparsity", "test accuracy", "params", "non-zero", "MACs (450 test images)",
         "file (pangkas.save)", "latency vs dense (95% interval)"),
        rows, markdown=True,
    )


def plot_pipeline(stages: list[Stage], path: Path) -> None:
    """Each recovered model's accuracy, MACs, file size and latency (with its 95% interval)
    relative to the dense model."""
    plt = pyplot()
    chosen = [s for s in stages if s.latency_ratio is not None]
    dense = chosen[0]
    labels = [s.name for s in chosen]
    fig, ax = plt.subplots(figsize=(9.5, 4))
    positions = range(len(chosen))
    width = 0.27
    latency = [s.latency for s in chosen]
    for offset, (label, values, error) in zip((-width, 0, width), (
            ("MACs vs dense", [s.macs / dense.macs for s in chosen], None),
            ("file vs dense", [s.file_bytes / dense.file_bytes for s in chosen], None),
            ("latency vs dense (95% interval)", [r.value for r in latency],
             [[r.value - r.low for r in latency], [r.high - r.value for r in latency]]))):
        ax.bar([p + offset for p in positions], values, width, yerr=error, capsize=2 if error else 0, label=label)
    for p, s in zip(positions, chosen):
        ax.text(p, 1.02, f"{s.accuracy:.1%}", ha="center", fontsize=8)
    ax.set_xticks(list(positions), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("relative to dense (accuracy on top)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title("digits CNN after pruning and recovery by distillation, and in int8")
    fig.tight_layout()
    write_figure(fig, path)


def plot(stages: list[Stage], path: Path) -> None:
    plt = pyplot()
    tuned = [s for s in stages if "no finetune" not in s.name]
    raw = [s for s in stages if "no finetune" in s.name]
    fig, acc_ax = plt.subplots(figsize=(7, 4))
    acc_ax.plot([s.sparsity * 100 for s in tuned], [s.accuracy * 100 for s in tuned], "o-",
                label="accuracy, fine-tuned")
    acc_ax.plot([s.sparsity * 100 for s in raw], [s.accuracy * 100 for s in raw], "x--",
                label="accuracy, before fine-tune")
    acc_ax.set_xlabel("weight sparsity (%)")
    acc_ax.set_ylabel("test accuracy (%)")
    size_ax = acc_ax.twinx()
    size_ax.plot([s.sparsity * 100 for s in tuned], [s.file_bytes / 1024 for s in tuned], "s:",
                 color="tab:green", label="file size (pangkas.save)")
    size_ax.set_ylabel("file size (KiB)")
    size_ax.set_ylim(bottom=0)
    lines = acc_ax.get_legend_handles_labels()
    more = size_ax.get_legend_handles_labels()
    acc_ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower left")
    acc_ax.set_title("digits CNN: accuracy and file size vs weight sparsity")
    fig.tight_layout()
    write_figure(fig, path)
