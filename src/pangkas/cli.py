"""The ``pangkas`` command: demo, measure, prune weights, channels or layers, compress to a budget.

Every failure is one line on stderr: exit status 2 when pangkas rejected the input (arguments,
option values, files), 1 when an operation failed; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import traceback
import warnings
from pathlib import Path

from rich.console import Console

from .errors import OperationFailed, PangkasError
from .quantize import SCHEMES

console = Console()
WEIGHT_CRITERIA = ("magnitude", "random", "wanda", "sparsegpt")


def say(text: str) -> None:
    """Print user-facing text as it is: never read as rich markup."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (argparse prints the whole usage block)."""

    def error(self, message: str):
        sys.stderr.write(f"error: {_one_line(message)} (see {self.prog} --help)\n")
        raise SystemExit(2)


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


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="torchvision:NAME, a Hugging Face directory, "
                        "package.module:factory, or a file written by pangkas.save")
    parser.add_argument("--weights", help="safetensors weights to load into MODEL")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow MODEL to be a pickled torch.save(model) file (runs its code!)")
    parser.add_argument("--trust-source", action="store_true",
                        help="let a saved MODEL file name any package.module:factory to import (runs its code!)")
    parser.add_argument("--input-shape", type=_shape, help="example input shape, e.g. 1,3,224,224")


def _debug_arg(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: given before or after the command, the flag is not reset by the other parser.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of a failure")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pangkas", description=__doc__)
    _debug_arg(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a digits CNN; prune weights, channels, layers; recover; report")
    demo.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    demo.add_argument("--overwrite", action="store_true",
                      help="write into a non-empty --out (only the demo's own files are replaced)")
    demo.add_argument("--quick", action="store_true", help="a few epochs only (for tests)")
    demo.add_argument("--seed", type=int, default=0)
    _debug_arg(demo)

    measure = commands.add_parser("measure", help="params, non-zeros, MACs, file sizes, latency")
    _model_args(measure)
    measure.add_argument("--no-latency", action="store_true", help="skip timing")
    _debug_arg(measure)

    prune = commands.add_parser("prune", help="prune a model and save the result")
    _debug_arg(prune)
    kinds = prune.add_subparsers(dest="kind", required=True)
    weights = kinds.add_parser("weights", help="unstructured or N:M weight pruning")
    _model_args(weights)
    rule = weights.add_mutually_exclusive_group(required=True)
    rule.add_argument("--sparsity", type=_fraction, help="fraction of weights to remove, in [0, 1)")
    rule.add_argument("--threshold", type=float, help="keep weights with |w| > THRESHOLD")
    rule.add_argument("--pattern", help="N:M, e.g. 2:4")
    weights.add_argument("--scope", choices=("local", "global"), default="local")
    weights.add_argument("--importance", choices=WEIGHT_CRITERIA, default="magnitude",
                         help="wanda / sparsegpt: one-shot, block by block on --data")
    _renamed_flag(weights, "--method", "--importance", choices=WEIGHT_CRITERIA)
    weights.add_argument("--data", help="calibration data for wanda / sparsegpt: a .safetensors file of inputs, or "
                         "for a Hugging Face MODEL a .txt file of texts")
    weights.add_argument("--batch-size", type=_positive, default=8)
    _max_memory_arg(weights)
    _selection_args(weights, "prune")
    _output_args(weights)

    channels = kinds.add_parser("channels", help="remove channels physically (smaller and faster)")
    _model_args(channels)
    channels.add_argument("--ratio", type=_fraction, help="fraction of channels to remove, in [0, 1)")
    channels.add_argument("--heads", type=_fraction, help="Hugging Face: fraction of attention heads to remove")
    channels.add_argument("--ffn", type=_fraction, help="Hugging Face: fraction of MLP neurons to remove")
    channels.add_argument("--hidden", type=_fraction, help="Hugging Face: fraction of the hidden size (approximate)")
    channels.add_argument("--rotate", action="store_true",
                          help="with --hidden and --data (LLaMA, Mistral, Qwen2, Qwen3): rotate the residual stream "
                          "onto its principal directions first, then drop the weakest (SliceGPT-style)")
    channels.add_argument("--importance", choices=("l1", "l2", "fpgm", "bn_scale", "wanda", "obs", "random"),
                          help="default: with --data, obs if --reconstruct else wanda; without, l1")
    channels.add_argument("--data", help="calibration data for --importance wanda and --reconstruct (as for "
                          "prune layers)")
    channels.add_argument("--reconstruct", action="store_true",
                          help="re-fit the layers that read removed channels on --data (least squares)")
    channels.add_argument("--allocation", choices=("uniform", "sensitivity"), default="uniform",
                          help="sensitivity: layers whose cut hurts less lose more, measured on --data")
    channels.add_argument("--batch-size", type=_positive, default=8)
    channels.add_argument("--scope", choices=("local", "global"), default="local")
    channels.add_argument("--round-to", type=_round_to, default=1,
                          help="keep channel counts multiples of N, or 'auto': the fastest width nearby")
    _selection_args(channels, "lose channels")
    _renamed_flag(channels, "--ignore", "--exclude", nargs="+")
    channels.add_argument("--allow-approximate", action="store_true",
                          help="also prune channels under LayerNorm/GroupNorm (not exact)")
    _max_memory_arg(channels)
    _output_args(channels)

    layers = kinds.add_parser("layers", help="remove whole blocks (shallower and faster)")
    _model_args(layers)
    count = layers.add_mutually_exclusive_group(required=True)
    count.add_argument("--n", type=_positive, help="number of blocks (whole layers of a layer list) to remove")
    count.add_argument("--ratio", type=_fraction, help="fraction of the removable blocks to remove")
    count.add_argument("--target-macs", type=_fraction, help="remove blocks until at most this fraction of "
                       "the MACs is left")
    count.add_argument("--target-params", type=_fraction, help="remove blocks until at most this fraction of "
                       "the parameters is left")
    layers.add_argument("--granularity", choices=("layers", "any"), default="layers",
                        help="layers: whole layers of a layer list; any: their sublayers too")
    layers.add_argument("--replace", choices=("linear",),
                        help="a least-squares linear map in place of the removed layers: folded into the layer "
                        "before (pre-norm models), else a stand-in module (save to .safetensors then)")
    layers.add_argument("--importance", choices=("block_influence", "angular", "magnitude", "linear_fit"),
                        help="default: block_influence (linear_fit for --replace linear on post-norm layers)")
    _renamed_flag(layers, "--criterion", "--importance", choices=("block_influence", "angular", "magnitude",
                                                                  "linear_fit"))
    _selection_args(layers, "be removed (blocks)")
    layers.add_argument("--data", help="calibration data: a .safetensors file of input tensors (split "
                        "along dim 0), or for a Hugging Face model a .txt file, one text per line; "
                        "default: random inputs (weak scores)")
    layers.add_argument("--batch-size", type=_positive, default=8)
    _max_memory_arg(layers)
    _output_args(layers)

    compress = commands.add_parser("compress", help="search widths and blocks for the most accurate model "
                                   "within a budget (latency on this machine, MACs, parameters, file size)")
    _model_args(compress)
    for flag, what in (("--latency", "time relative to the dense model's, measured here at --input-shape"),
                       ("--macs", "MACs: a fraction of the dense model's (<= 1) or a count"),
                       ("--params", "parameters: a fraction of the dense model's (<= 1) or a count"),
                       ("--file-size", "file size: a fraction of the dense model's (<= 1) or bytes")):
        compress.add_argument(flag, type=_positive_number, help=what)
    compress.add_argument("--data", help="calibration data (as for prune layers); the last quarter of its "
                          "batches is held back to score the result; default: random inputs (weak choices)")
    compress.add_argument("--batch-size", type=_positive, default=8)
    compress.add_argument("--no-width", action="store_true", help="do not cut channels, heads or FFN neurons")
    compress.add_argument("--no-depth", action="store_true", help="do not remove blocks")
    compress.add_argument("--step", type=_fraction, default=0.125,
                          help="fraction of a group's channels removed per search step (default 0.125)")
    compress.add_argument("--no-reconstruct", action="store_true",
                          help="do not re-fit the layers that read removed channels (least squares on --data)")
    compress.add_argument("--replace", choices=("linear",), help="fitted linear maps in place of removed blocks")
    compress.add_argument("--recover-steps", type=int, default=0,
                          help="fine-tune each finalist this many batches of --data, distilling from the dense model")
    compress.add_argument("--quantize", choices=("int8-dynamic", "int8-weight-only"),
                          help="quantize every finalist's Linear layers, so that the budget is met by pruning and "
                               "int8 together (-o OUT.safetensors)")
    compress.add_argument("--recover-rounds", type=int, default=0,
                          help="also fine-tune --recover-steps batches this many times during each search, on the way "
                               "to the budget (NetAdapt's short-term fine-tune)")
    _selection_args(compress, "lose channels or be removed")
    _output_args(compress)

    quantize = commands.add_parser("quantize", help="int8 on top of a (pruned) model: .safetensors (torchao; "
                                   "pangkas.load) or, for int8-static / int8-dynamic, .onnx (onnxruntime's quantizer)")
    _model_args(quantize)
    quantize.add_argument("--scheme", required=True, choices=SCHEMES,
                          help="int8-dynamic / int8-weight-only: Linear layers; int8-static: convolutions and "
                               "Linear layers, activations calibrated on --data")
    quantize.add_argument("--data", help="calibration data (as for prune layers); default: random inputs")
    quantize.add_argument("--batch-size", type=_positive, default=8)
    _selection_args(quantize, "be quantized")
    _output_args(quantize)
    return parser


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _max_memory_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-memory", help="a Hugging Face MODEL into an OUT_DIR, one block in memory at a time "
                        "(streamed; weights always stream into a directory): refuse up front if the estimated peak "
                        "exceeds this, e.g. 4GB")


def _selection_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--include", nargs="+", help=f"module-name globs that may {what} (default: all)")
    parser.add_argument("--exclude", nargs="+", help=f"module-name globs that may not {what}")


class _Renamed(argparse.Action):
    """An old flag: still accepted (with a warning) and stored under the new flag's name."""

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(f"{option_string} is now {self.metavar}; the old name will be removed in the next release",
                      DeprecationWarning, stacklevel=2)
        setattr(namespace, self.dest, values)


def _renamed_flag(parser: argparse.ArgumentParser, old: str, new: str, **kwargs) -> None:
    parser.add_argument(old, dest=new.lstrip("-").replace("-", "_"), action=_Renamed, metavar=new,
                        help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)


def _output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True,
                        help="the pruned model: a .safetensors file, or for a Hugging Face MODEL a directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT file, or write "
                        "into a non-empty OUTPUT directory (only the files pangkas writes are replaced)")
    parser.add_argument("--overwrite-input", action="store_true", help="allow OUTPUT to be the MODEL itself")
    _debug_arg(parser)


def _resolve(args):
    from .sources import check_runs, resolve

    with console.status("loading the model"):
        source = resolve(args.model, weights=args.weights, allow_pickle=args.allow_pickle,
                         input_shape=args.input_shape, trust_source=args.trust_source)
        check_runs(source)
    return source


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, overwrite=args.overwrite)
    out = Path(args.out)
    say((out / "results.md").read_text())
    say(f"pruned models, results.md, weights.png and pipeline.png written to {out}/")


def _measure(args) -> None:
    from .measure import compare, measure

    source = _resolve(args)
    with console.status("measuring"):
        result = measure(source.model, source.example_inputs, latency=not args.no_latency)
    say(compare(result, names=(args.model,)))


def _check_output(args) -> bool:
    """Refuse an output pangkas may not write before any work; True if it is a directory."""
    from .files import check_directory_target, check_file_target

    if args.output.endswith(".safetensors"):
        inputs = [Path(p).resolve() for p in (args.model, args.weights) if p is not None and Path(p).is_file()]
        if Path(args.output).resolve() not in inputs:
            check_file_target(args.output, overwrite=args.overwrite)
        elif not args.overwrite_input:
            raise PangkasError(f"{args.output} is the input; write elsewhere or pass --overwrite-input")
        return False
    if not Path(args.model).is_dir():
        raise PangkasError(f"-o must name a .safetensors file (or a directory for a Hugging Face model), "
                           f"got {args.output!r}")
    check_directory_target(args.output, overwrite=args.overwrite, inputs=[args.model],
                           overwrite_input=args.overwrite_input, copied_from=args.model)
    return True


def _prune(args) -> None:
    """Check the output, load, prepare the pruning, measure, prune, save, measure again, compare."""
    from .io import save
    from .measure import compare, measure
    from .sources import describe, save_pretrained

    to_directory = _check_output(args)
    if args.kind == "weights" and to_directory:
        _prune_weights_streamed(args)
        return
    if args.kind in ("channels", "layers") and to_directory and args.max_memory is not None:
        (_prune_channels_streamed if args.kind == "channels" else _prune_layers_streamed)(args)
        return
    if getattr(args, "max_memory", None) is not None:
        raise PangkasError("--max-memory applies to a Hugging Face MODEL pruned into an OUT_DIR (streamed)")
    source = _resolve(args)
    prune = PRUNERS[args.kind](source, args)  # every option checked before the work starts
    with console.status("measuring"):
        before = measure(source.model, source.example_inputs, latency=False)
    with console.status(f"pruning {args.kind}"):
        report = prune()
    say(str(report))
    with console.status("saving"):
        if to_directory:
            save_pretrained(source, args.output, overwrite=args.overwrite, overwrite_input=args.overwrite_input)
        else:
            save(source.model, args.output, metadata=describe(source), overwrite=args.overwrite,
                 overwrite_input=args.overwrite_input)
    with console.status("measuring"):
        after = measure(source.model, source.example_inputs, latency=False)
    say(compare(before, after))
    say(f"wrote {args.output}")
    if to_directory:
        _say_if_remote_code(args.output)


def _say_if_remote_code(output: str) -> None:
    from .integrations.hf_directory import CODE_FILE

    if (Path(output) / CODE_FILE).is_file():
        say(f"its config cannot say every pruned size: load it with "
            f"from_pretrained({output!r}, trust_remote_code=True) ({CODE_FILE} rebuilds them)")


def _compress(args) -> None:
    """Check the outputs, load, search, save the chosen model, its report (JSON) and plot."""
    import dataclasses
    import json

    from .compress import compress
    from .files import check_file_target, write_file
    from .io import save
    from .sources import calibration_batches, describe, save_pretrained

    to_directory = _check_output(args)
    if to_directory and args.quantize:
        raise PangkasError("--quantize writes int8 weights that pangkas.save keeps: -o OUT.safetensors (for a Hugging "
                           "Face directory, quantize after compressing and use pangkas.export_compressed_tensors)")
    stem = Path(args.output.rstrip("/\\")).with_suffix("") if not to_directory else Path(args.output.rstrip("/\\"))
    plot, summary = Path(f"{stem}.pareto.png"), Path(f"{stem}.compress.json")
    for path in (plot, summary):
        check_file_target(path, overwrite=args.overwrite)
    if args.recover_steps < 0 or args.recover_rounds < 0:
        raise PangkasError(f"--recover-steps and --recover-rounds must be >= 0, got {args.recover_steps} and "
                           f"{args.recover_rounds}")
    if args.recover_rounds and not args.recover_steps:
        raise PangkasError("--recover-rounds fine-tunes --recover-steps batches each round: give --recover-steps")
    source = _resolve(args)
    if args.data is None:
        say("no --data: searching on random inputs, which says little about real data")
    batches = calibration_batches(source, args.data, args.batch_size)
    small, report = compress(source.model, batches, latency=args.latency, macs=args.macs, params=args.params,
                             file_size=args.file_size, example_inputs=source.example_inputs,
                             width=not args.no_width, depth=not args.no_depth, step=args.step,
                             reconstruct=not args.no_reconstruct, replace=args.replace,
                             recover_steps=args.recover_steps, recover_rounds=args.recover_rounds, quantize=args.quantize,
                             include=args.include, exclude=args.exclude)
    say(str(report))
    source = dataclasses.replace(source, model=small)
    with console.status("saving"):
        if to_directory:
            save_pretrained(source, args.output, overwrite=args.overwrite, overwrite_input=args.overwrite_input)
        else:
            save(small, args.output, metadata=describe(source), overwrite=args.overwrite,
                 overwrite_input=args.overwrite_input)
        write_file(summary, json.dumps(report.to_dict(), indent=1).encode(), overwrite=args.overwrite)
        report.plot(plot, overwrite=args.overwrite)
    say(f"wrote {args.output}, {summary} and {plot}")


def _quantize(args) -> None:
    """Check the output, load, quantize, write (.safetensors or .onnx), say what stayed in floating point."""
    from .export import export_onnx
    from .files import check_file_target
    from .io import save
    from .onnx_quant import SCHEMES as ONNX_SCHEMES
    from .quantize import quantize
    from .sources import calibration_batches, describe

    onnx = args.output.endswith(".onnx")
    if onnx and args.scheme not in ONNX_SCHEMES:
        raise PangkasError(f"{args.scheme} weights run in PyTorch (torchao), not in ONNX: -o OUT.safetensors, "
                           f"or --scheme {' or '.join(ONNX_SCHEMES)} for an ONNX file")
    if onnx:
        check_file_target(args.output, overwrite=args.overwrite)
    elif not args.output.endswith(".safetensors"):
        raise PangkasError(f"-o must name a .safetensors or .onnx file for a quantized model, got {args.output!r}")
    else:
        _check_output(args)
    source = _resolve(args)
    if args.data is None:
        say("no --data: calibrating on random inputs, which says little about real data")
    batches = calibration_batches(source, args.data, args.batch_size)
    if onnx:  # onnxruntime's own quantizer: its file runs faster there than torchao's graph exported
        with console.status(f"quantizing ({args.scheme}) with onnxruntime's quantizer"):
            # traced at a calibration batch: an example of batch size 1 would fix the batch size at 1
            say(str(export_onnx(source.model, args.output, batches[0], quantize=args.scheme, data=batches,
                                include=args.include, exclude=args.exclude, overwrite=args.overwrite)))
        return
    with console.status(f"quantizing ({args.scheme})"):
        small, report = quantize(source.model, batches, args.scheme, include=args.include, exclude=args.exclude)
    say(str(report))
    with console.status("writing"):
        save(small, args.output, metadata=describe(source), overwrite=args.overwrite,
             overwrite_input=args.overwrite_input)
    say(f"wrote {args.output}")


def _prune_weights(source, args):
    from .sources import calibration_batches
    from .weights import prune_weights

    data = None if args.data is None else calibration_batches(source, args.data, args.batch_size)
    return lambda: prune_weights(source.model, sparsity=args.sparsity, threshold=args.threshold,
                                 pattern=args.pattern, scope=args.scope, importance=args.importance,
                                 include=args.include, exclude=args.exclude, data=data)


def _streamed_data(args) -> list | None:
    """--data for a streamed run: the MODEL directory is not loaded, only its tokenizer for a .txt."""
    from .sources import Source, calibration_batches

    if args.weights is not None or args.overwrite_input:
        raise PangkasError("a directory is pruned into a new directory: --weights and --overwrite-input do not apply")
    if args.scope != "local":
        raise PangkasError("--scope global ranks the whole model at once; a directory is pruned one block at a "
                           "time: use --scope local, or prune in memory")
    if args.data is None:
        return None
    return calibration_batches(Source(None, None, args.model, (), Path(args.model)), args.data, args.batch_size)


def _prune_channels_streamed(args) -> None:
    """Heads, MLP neurons, hidden size of a Hugging Face directory into a directory, streamed."""
    from .stream import prune_transformer

    unsupported = [flag for flag, on in (("--ratio", args.ratio is not None), ("--rotate", args.rotate),
                                         ("--reconstruct", args.reconstruct),
                                         ("--allocation sensitivity", args.allocation != "uniform"),
                                         ("--allow-approximate", args.allow_approximate)) if on]
    if unsupported:
        raise PangkasError(f"{', '.join(unsupported)} cannot be streamed (--max-memory): streamed channel pruning "
                           "takes --heads/--ffn/--hidden with a per-tensor --importance")
    data = _streamed_data(args)
    report = prune_transformer(args.model, args.output, heads=args.heads, ffn=args.ffn, hidden=args.hidden,
                               importance=args.importance or ("wanda" if data else "l1"), data=data,
                               include=args.include, exclude=args.exclude, round_to=args.round_to,
                               max_memory=args.max_memory, overwrite=args.overwrite)
    say(str(report))
    say(f"wrote {args.output} (a checkpoint directory from_pretrained loads)")
    _say_if_remote_code(args.output)


def _prune_layers_streamed(args) -> None:
    """Whole blocks of a Hugging Face directory into a directory, streamed."""
    from .stream import prune_layers

    unsupported = [flag for flag, on in (("--target-macs", args.target_macs is not None),
                                         ("--target-params", args.target_params is not None),
                                         ("--replace", args.replace is not None),
                                         ("--granularity any", args.granularity != "layers")) if on]
    if unsupported:
        raise PangkasError(f"{', '.join(unsupported)} cannot be streamed (--max-memory): streamed layer pruning "
                           "removes --n or --ratio whole layers by block_influence or magnitude")
    args.scope = "local"  # no --scope for layers
    data = _streamed_data(args)
    if data is None and args.importance != "magnitude":
        raise PangkasError("streamed --importance block_influence needs --data (the model is not loaded to make "
                           "random inputs)")
    report = prune_layers(args.model, args.output, n=args.n, ratio=args.ratio, data=data,
                          importance=args.importance or "block_influence", include=args.include,
                          exclude=args.exclude, max_memory=args.max_memory, overwrite=args.overwrite)
    say(str(report))
    say(f"wrote {args.output} (a checkpoint directory from_pretrained loads)")


def _prune_weights_streamed(args) -> None:
    """A Hugging Face directory into a directory, one block in memory at a time (``pangkas.stream``)."""
    from .stream import prune_weights

    data = _streamed_data(args)
    report = prune_weights(args.model, args.output, sparsity=args.sparsity, threshold=args.threshold,
                           pattern=args.pattern, importance=args.importance, data=data, include=args.include,
                           exclude=args.exclude, max_memory=args.max_memory, overwrite=args.overwrite)
    say(str(report))
    say(f"wrote {args.output} (a checkpoint directory from_pretrained loads)")


def _prune_channels(source, args):
    from .channels import prune_channels
    from .transformer import prune_transformer

    common = dict(importance=args.importance, scope=args.scope, round_to=args.round_to,
                  include=args.include, exclude=args.exclude, reconstruct=args.reconstruct,
                  allocation=args.allocation)
    needs = ("--reconstruct" if args.reconstruct else "--rotate" if args.rotate
             else f"--importance {args.importance}" if args.importance in ("wanda", "obs")
             else "--allocation sensitivity" if args.allocation != "uniform" else None)
    if args.data is None and needs:
        raise PangkasError(f"{needs} needs calibration data: give --data")
    if args.data is not None:
        from .sources import calibration_batches

        common["data"] = calibration_batches(source, args.data, args.batch_size)
    if any(v is not None for v in (args.heads, args.ffn, args.hidden)):
        if args.ratio is not None:
            raise PangkasError("give --ratio, or --heads/--ffn/--hidden, not both")
        if source.directory is None:
            raise PangkasError("--heads/--ffn/--hidden prune a Hugging Face model; give --ratio for others")
        if args.allow_approximate:
            raise PangkasError("--allow-approximate applies to --ratio; --hidden is approximate by itself")

        if args.rotate:  # the rotation's principal directions are its importance: no channel options
            common = {k: common.get(k) for k in ("data", "importance", "include", "exclude", "reconstruct")}

        def transformer():
            with warnings.catch_warnings():  # the CLI saves with pangkas.save_pretrained and says how to load
                warnings.filterwarnings("ignore", message=".*config cannot say")
                return prune_transformer(source.model, source.example_inputs, heads=args.heads,
                                         ffn=args.ffn, hidden=args.hidden, rotate=args.rotate, **common)
        return transformer
    if args.rotate:
        raise PangkasError("--rotate prunes --hidden of a Hugging Face model: give --hidden (and --data)")
    if args.ratio is None:
        raise PangkasError("give --ratio (or, for a Hugging Face model, --heads/--ffn/--hidden)")
    return lambda: prune_channels(source.model, source.example_inputs, ratio=args.ratio,
                                  allow_approximate=args.allow_approximate, **common)


def _prune_layers(source, args):
    from .layers import prune_layers
    from .sources import calibration_batches

    if args.data is None:
        say("no --data: scoring blocks on random inputs, which says little about real data")
    batches = calibration_batches(source, args.data, args.batch_size)
    return lambda: prune_layers(source.model, batches, n=args.n, ratio=args.ratio, importance=args.importance,
                                include=args.include, exclude=args.exclude, granularity=args.granularity,
                                target_macs=args.target_macs, target_params=args.target_params,
                                replace=args.replace)


PRUNERS = {"weights": _prune_weights, "channels": _prune_channels, "layers": _prune_layers}
HANDLERS = {"demo": _demo, "measure": _measure, "prune": _prune, "compress": _compress, "quantize": _quantize}


def main(argv: list[str] | None = None) -> int:
    """Run the command; return its exit status (0, 1 failed, 2 rejected input, 130 interrupted)."""
    with warnings.catch_warnings(record=True) as caught, _collected_logs() as logged:
        warnings.simplefilter("default")
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exit:  # --help (0) or a usage error, already printed in one line
            return exit.code if isinstance(exit.code, int) else 2
        try:
            HANDLERS[args.command](args)
        except BaseException as exc:  # noqa: BLE001 -- the CLI's one place that reports everything
            return _fail(exc, getattr(args, "debug", False))
    # Only on success: a failure is one line.
    for message in dict.fromkeys([str(w.message) for w in caught] + logged):
        sys.stderr.write(f"warning: {_one_line(message)}\n")
    return 0


@contextlib.contextmanager
def _collected_logs():
    """Collect what libraries log at WARNING and above (instead of printing it as it comes)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler, root = Collect(logging.WARNING), logging.getLogger()
    root.addHandler(handler)
    # torchao (which transformers imports too) registers enums with torch's pytree the deprecated
    # way, and torch logs a line for each, on its own handler: noise on every Hugging Face command.
    pytree = logging.getLogger("torch.utils._pytree")
    level = pytree.level
    pytree.setLevel(logging.ERROR)
    try:
        yield messages
    finally:
        root.removeHandler(handler)
        pytree.setLevel(level)


def _fail(exc: BaseException, debug: bool) -> int:
    if isinstance(exc, SystemExit):
        raise exc
    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, KeyboardInterrupt):
        sys.stderr.write("error: interrupted\n")
        return 130
    if isinstance(exc, PangkasError) and not isinstance(exc, OperationFailed):
        status, text = 2, str(exc)
    else:
        status, text = 1, str(exc) if isinstance(exc, OperationFailed) else f"{type(exc).__name__}: {exc}"
    hint = "" if debug or status == 2 else " (--debug shows the traceback)"
    sys.stderr.write(f"error: {_one_line(text)}{hint}\n")
    return status


if __name__ == "__main__":
    # `python -m` puts the working directory first on sys.path; a module a file names must not be
    # found there (the `pangkas` script does not search it either).
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]
    sys.exit(main())
