"""The ``pangkas`` command: demo, measure, prune weights."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from rich.console import Console

from .errors import PangkasError

console = Console()


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 1,3,224,224, got {text!r}")
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return shape


def _round_to(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}")


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="torchvision:NAME, a Hugging Face directory, "
                        "package.module:factory, or a file written by pangkas.save")
    parser.add_argument("--weights", help="safetensors weights to load into MODEL")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow MODEL to be a pickled torch.save(model) file (runs its code!)")
    parser.add_argument("--input-shape", type=_shape, help="example input shape, e.g. 1,3,224,224")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pangkas", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a digits CNN; prune weights, channels, layers; recover; report")
    demo.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    demo.add_argument("--quick", action="store_true", help="a few epochs only (for tests)")
    demo.add_argument("--seed", type=int, default=0)

    measure = commands.add_parser("measure", help="params, non-zeros, MACs, file sizes, latency")
    _model_args(measure)
    measure.add_argument("--no-latency", action="store_true", help="skip timing")

    prune = commands.add_parser("prune", help="prune a model and save the result")
    kinds = prune.add_subparsers(dest="kind", required=True)
    weights = kinds.add_parser("weights", help="unstructured or N:M weight pruning")
    _model_args(weights)
    rule = weights.add_mutually_exclusive_group(required=True)
    rule.add_argument("--sparsity", type=float, help="fraction of weights to remove, in [0, 1)")
    rule.add_argument("--threshold", type=float, help="keep weights with |w| > THRESHOLD")
    rule.add_argument("--pattern", help="N:M, e.g. 2:4")
    weights.add_argument("--scope", choices=("local", "global"), default="local")
    weights.add_argument("--method", choices=("magnitude", "random"), default="magnitude")
    weights.add_argument("--include", nargs="+", help="module-name globs to prune (default: all)")
    weights.add_argument("--exclude", nargs="+", help="module-name globs to leave alone")
    _output_args(weights)

    channels = kinds.add_parser("channels", help="remove channels physically (smaller and faster)")
    _model_args(channels)
    channels.add_argument("--ratio", type=float, help="fraction of channels to remove, in [0, 1)")
    channels.add_argument("--heads", type=float, help="Hugging Face: fraction of attention heads to remove")
    channels.add_argument("--ffn", type=float, help="Hugging Face: fraction of MLP neurons to remove")
    channels.add_argument("--hidden", type=float, help="Hugging Face: fraction of the hidden size (approximate)")
    channels.add_argument("--importance", choices=("l1", "l2", "fpgm", "bn_scale", "wanda", "random"), default="l1")
    channels.add_argument("--data", help="calibration data for --importance wanda (as for prune layers)")
    channels.add_argument("--batch-size", type=int, default=8)
    channels.add_argument("--scope", choices=("local", "global"), default="local")
    channels.add_argument("--round-to", type=_round_to, default=1,
                          help="keep channel counts multiples of N, or 'auto': the fastest width nearby")
    channels.add_argument("--ignore", nargs="+", default=(), help="module-name globs to keep whole")
    channels.add_argument("--allow-approximate", action="store_true",
                          help="also prune channels under LayerNorm/GroupNorm (not exact)")
    _output_args(channels)

    layers = kinds.add_parser("layers", help="remove whole blocks (shallower and faster)")
    _model_args(layers)
    count = layers.add_mutually_exclusive_group(required=True)
    count.add_argument("--n", type=int, help="number of blocks to remove")
    count.add_argument("--ratio", type=float, help="fraction of the removable blocks to remove")
    layers.add_argument("--criterion", choices=("block_influence", "angular", "magnitude"),
                        default="block_influence")
    layers.add_argument("--data", help="calibration data: a .safetensors file of input tensors (split "
                        "along dim 0), or for a Hugging Face model a .txt file, one text per line; "
                        "default: random inputs (weak scores)")
    layers.add_argument("--batch-size", type=int, default=8)
    _output_args(layers)
    return parser


def _output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True,
                        help="the pruned model: a .safetensors file, or for a Hugging Face MODEL a directory")
    parser.add_argument("--overwrite-input", action="store_true", help="allow OUTPUT to be the MODEL file itself")


def _resolve(args):
    from .sources import resolve

    with console.status(f"loading {args.model}"):
        return resolve(args.model, weights=args.weights, allow_pickle=args.allow_pickle,
                       input_shape=args.input_shape)


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed)
    out = Path(args.out)
    console.print((out / "results.md").read_text(), markup=False, soft_wrap=True)
    console.print(f"pruned models, results.md, weights.png and pipeline.png written to {out}/")


def _measure(args) -> None:
    from .measure import compare, measure

    source = _resolve(args)
    with console.status("measuring"):
        result = measure(source.model, source.example_inputs, latency=not args.no_latency)
    console.print(compare(result, names=(args.model,)), markup=False, soft_wrap=True)


def _prune(args) -> None:
    """Load, measure, prune (weights or channels), save, measure again, compare."""
    from .integrations.hf_directory import CODE_FILE
    from .io import save
    from .measure import compare, measure
    from .sources import describe, save_pretrained

    source = _resolve(args)
    to_directory = source.directory is not None and not args.output.endswith(".safetensors")
    if not to_directory and not args.output.endswith(".safetensors"):
        raise PangkasError(f"-o must name a .safetensors file (or a directory for a Hugging Face model), "
                           f"got {args.output!r}")
    if to_directory and args.kind == "weights":
        raise PangkasError("weight pruning keeps every shape and saves compactly only with pangkas.save: "
                           "-o OUT.safetensors")
    with console.status("measuring"):
        before = measure(source.model, source.example_inputs, latency=False)
    with console.status(f"pruning {args.kind}"):
        report = PRUNERS[args.kind](source, args)
    console.print(str(report), markup=False, soft_wrap=True)
    with console.status("saving"):
        if to_directory:
            save_pretrained(source, args.output, overwrite_input=args.overwrite_input)
        else:
            save(source.model, args.output, metadata=describe(source), overwrite_input=args.overwrite_input)
    with console.status("measuring"):
        after = measure(source.model, source.example_inputs, latency=False)
    console.print(compare(before, after), markup=False, soft_wrap=True)
    console.print(f"wrote {args.output}")
    if to_directory and (Path(args.output) / CODE_FILE).is_file():
        console.print(f"its config cannot say every pruned size: load it with "
                      f"from_pretrained({args.output!r}, trust_remote_code=True) ({CODE_FILE} rebuilds them)")


def _prune_weights(source, args):
    from .weights import prune_weights

    return prune_weights(source.model, sparsity=args.sparsity, threshold=args.threshold,
                         pattern=args.pattern, scope=args.scope, method=args.method,
                         include=args.include, exclude=args.exclude)


def _prune_channels(source, args):
    from .channels import prune_channels
    from .integrations.huggingface import prune_transformer

    common = dict(importance=args.importance, scope=args.scope, round_to=args.round_to, ignore=args.ignore)
    if args.importance == "wanda":
        from .sources import calibration_batches

        if args.data is None:
            raise PangkasError("--importance wanda measures activations: give --data")
        common["data"] = calibration_batches(source, args.data, args.batch_size)
    if any(v is not None for v in (args.heads, args.ffn, args.hidden)):
        if args.ratio is not None:
            raise PangkasError("give --ratio, or --heads/--ffn/--hidden, not both")
        with warnings.catch_warnings():  # the CLI saves with pangkas.save_pretrained and says how to load
            warnings.filterwarnings("ignore", message=".*config cannot say")
            return prune_transformer(source.model, source.example_inputs, heads=args.heads, ffn=args.ffn,
                                     hidden=args.hidden, **common)
    if args.ratio is None:
        raise PangkasError("give --ratio (or, for a Hugging Face model, --heads/--ffn/--hidden)")
    return prune_channels(source.model, source.example_inputs, ratio=args.ratio,
                          allow_approximate=args.allow_approximate, **common)


def _prune_layers(source, args):
    from .layers import prune_layers
    from .sources import calibration_batches

    if args.data is None:
        console.print("no --data: scoring blocks on random inputs, which says little about real data")
    batches = calibration_batches(source, args.data, args.batch_size)
    return prune_layers(source.model, batches, n=args.n, ratio=args.ratio, criterion=args.criterion)


PRUNERS = {"weights": _prune_weights, "channels": _prune_channels, "layers": _prune_layers}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"demo": _demo, "measure": _measure, "prune": _prune}[args.command]
    try:
        handler(args)
    except PangkasError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
