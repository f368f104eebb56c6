"""The `vit` command. fit / validate / test are LightningCLI (`vit.lightning_cli`); the other subcommands are small
argparse front ends over the library (`vit.predict`, `vit.explain`, `vit.export`, `vit.catalog`).

User errors (a missing checkpoint, a bad option) print one line and exit with status 2; they never print a
traceback. An input image that cannot be read is a failed input, as in `vit predict`: one line, status 1.
Output into a pipe whose reader stops early (`vit predict DIR | head`) ends quietly with status 141, as a Unix
tool stopped by SIGPIPE does, and output that cannot be written (a full disk) in one line, status 1. `vit predict`
stopped by Ctrl-C or SIGTERM says so in one line, with status 130 or 143, and so does any command stopped by Ctrl-C
while it starts (torch, timm and Lightning import in `main`, not before) and `vit export|attention` stopped by
either (an export's --out is then the file that was there, or none).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from vit.cli_exit import CheckedOutput, OutputError, Terminated, sigterm_as_exception, stdout_to_devnull

# vit.weights' CheckpointError is a ValueError; naming it here would import torch before main() can catch a Ctrl-C
USER_ERRORS = (FileNotFoundError, ValueError)
ONNX_TOLERANCE = 1e-3  # largest |logit difference| `vit export` accepts from onnxruntime without a warning
BROKEN_PIPE_STATUS = 128 + 13  # 128 + SIGPIPE: what a shell reports for `cat`, `grep` ... stopped by `| head`


def _models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model variants")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'vit_small*'")
    p.set_defaults(handler=_models)


def _models(args: argparse.Namespace) -> int:
    from vit.catalog import print_models

    return print_models(args.pattern)


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type; its message follows argparse's 'argument --batch-size: ...', not the function's name."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer of at least {minimum}, got {text!r}")
        return value

    return parse


def _source(text: str) -> str:
    if not text:  # '' would be read as '.', the current folder
        from vit.images import EMPTY_SOURCE

        raise argparse.ArgumentTypeError(EMPTY_SOURCE)
    return text


def _path_list(text: str) -> list[str]:
    """An argparse type for `--files-from`: the paths listed in a file (`-`: stdin), one a line, as tar's -T reads
    them; blank lines are skipped, and names are kept byte for byte (surrogate-escaped, as Python gives argv)."""
    try:
        data = sys.stdin.buffer.read() if text == "-" else Path(text).read_bytes()
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"{text}: no such file") from None
    except IsADirectoryError:  # the folder itself was meant as a SOURCE, probably
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file listing paths") from None
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text}: cannot read it ({(e.strerror or str(e)).lower()})") from None
    return [os.fsdecode(line) for line in data.splitlines() if line.strip()]


def _add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", "-c", required=True, help="a .ckpt, a weights file or folder, or a timm tag")
    p.add_argument(
        "--model",
        metavar="NAME",
        help="the variant (see `vit models`) or timm ViT name of a weights file that carries no model config, e.g. a "
        "timm state dict",
    )


def _predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify image files or folders of them (searched recursively)")
    p.add_argument("sources", nargs="*", type=_source, metavar="SOURCE", help="image files and folders")
    p.add_argument(
        "--files-from",
        metavar="FILE",
        type=_path_list,
        help="also classify the files and folders listed in FILE, one a line ('-': stdin)",
    )
    _add_checkpoint_options(p)
    p.add_argument("--topk", type=_int_at_least(1), default=5, help="how many classes to report per image")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--batch-size", type=_int_at_least(1), default=32)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    p.add_argument(
        "--num-workers", type=_int_at_least(0), default=None, help="decoding processes (default: by core count)"
    )
    p.add_argument(
        "--amp",
        action="store_true",
        help="run the model under autocast in --amp-dtype: several times faster on GPUs and on CPUs with AMX "
        "(it warns where it is slower); probabilities move by up to about 0.01",
    )
    p.add_argument(
        "--amp-dtype", choices=("bfloat16", "float16"), help="the autocast type; implies --amp (default: bfloat16)"
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(handler=_predict)


def inputs(n: int) -> str:
    """'1 input', '3 inputs': the count of images `vit predict` reports."""
    return f"{n} input" if n == 1 else f"{n} inputs"


def _predict(args: argparse.Namespace) -> int:
    import torch

    from vit.predict import Predictor, write_results

    if hasattr(sys.stdout, "reconfigure"):
        # A file name that is not valid UTF-8 (a Latin-1 name from an old archive) reaches Python as surrogates, which
        # a UTF-8 locale's strict stdout refuses mid-run; written back as the name's own bytes, as `ls` writes it.
        sys.stdout.reconfigure(errors="surrogateescape")
    if not args.sources and args.files_from is None:
        raise ValueError("no SOURCE: name image files or folders, or list them with --files-from FILE")
    sources = args.sources + (args.files_from or [])
    if not sources:  # an empty list (a `find` that found nothing): nothing to classify, which is no error
        print("vit predict: warning: --files-from lists no files: nothing to classify", file=sys.stderr)
    done = failed = 0

    def counted(results: Iterator[dict]) -> Iterator[dict]:
        nonlocal done, failed
        for r in results:
            yield r
            done, failed = done + 1, failed + (r["error"] is not None)

    output = CheckedOutput(sys.stdout)
    try:
        with sigterm_as_exception():
            predictor = Predictor.from_checkpoint(
                args.checkpoint,
                device=args.device,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                amp=args.amp or args.amp_dtype is not None,
                amp_dtype=getattr(torch, args.amp_dtype or "bfloat16"),
                model_name=args.model,
            )
            results = predictor.iter_predict(sources, topk=args.topk, progress=False if args.quiet else None)
            write_results(counted(results), args.format, output)  # JSON and CSV go out as they come
            output.flush()
    except OutputError as e:  # a full disk, a file-size limit: not a traceback, and not a failed input
        print(f"vit predict: error: {e}; stopped after {inputs(done)}: the output is incomplete", file=sys.stderr)
        stdout_to_devnull()
        return 1
    except (KeyboardInterrupt, Terminated) as e:
        name, number = ("SIGTERM", signal.SIGTERM) if isinstance(e, Terminated) else ("Ctrl-C", signal.SIGINT)
        # a table goes out once every input is classified, and may be stopped while it does
        written = "the table is not written" if not output.written else "the output is incomplete"
        print(f"vit predict: stopped by {name} after {inputs(done)}: {written}", file=sys.stderr)
        return 128 + number  # 130 or 143, what a shell reports for a command that the signal ended
    if failed:
        print(f"vit predict: {failed} of {inputs(done)} could not be classified", file=sys.stderr)
    return 1 if failed else 0


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a checkpoint as ONNX or safetensors")
    _add_checkpoint_options(p)
    p.add_argument("--format", choices=("onnx", "safetensors"), help="default: from the suffix of --out")
    p.add_argument("--out", "-o", required=True, help="the file to write")
    p.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from vit.export import FORMATS, export_checkpoint, onnx_logit_difference

    fmt = args.format or Path(args.out).suffix.lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"cannot tell the format from {args.out!r}: give --format onnx or --format safetensors")
    model, out = export_checkpoint(args.checkpoint, fmt, args.out, args.model)
    note = ""
    if fmt == "onnx":
        try:
            difference = onnx_logit_difference(model, out)
            note = f"; onnxruntime logits within {difference:.1e} of torch's"
            if difference > ONNX_TOLERANCE:  # float32 rounding stays near 1e-6: this is an export gone wrong
                print(
                    f"vit export: warning: {out}: onnxruntime's logits differ from torch's by {difference:.1e}; "
                    "do not deploy it unchecked",
                    file=sys.stderr,
                )
        except ImportError:
            note = "; onnxruntime is not installed, so the file was not checked"
    print(f"wrote {out} ({fmt}{note})")
    return 0


# vit.explain's method names (a test holds them equal), here because vit.explain imports torch (seconds), which
# `vit attention --help` and a mistyped method need not wait for
ATTENTION_METHODS = ("raw", "rollout", "grad_rollout", "chefer")
HEAD_FUSIONS = ("mean", "max", "min")  # vit.explain.HEAD_FUSIONS, for the same reason


def _attention_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attention", help="draw an attention map of one image: image, map and overlay")
    p.add_argument("image", type=_source, help="an image file")
    _add_checkpoint_options(p)
    p.add_argument(
        "--method",
        choices=ATTENTION_METHODS,
        metavar="METHOD",
        help="%(choices)s; default: raw with --layer/--head, else rollout",
    )
    p.add_argument("--layer", type=int, help="block of the raw map (default: the last)")
    p.add_argument("--head", type=int, help="head of the raw map (default: the mean over heads)")
    p.add_argument("--head-fusion", choices=HEAD_FUSIONS, help="how (grad_)rollout fuses the heads (default: mean)")
    p.add_argument(
        "--discard-ratio",
        type=float,
        help="share of each fused map's weakest weights (grad_)rollout zeroes (default 0)",
    )
    p.add_argument("--target", type=int, help="class index a gradient method explains (default: the predicted class)")
    p.add_argument("--out", "-o", required=True, help="the figure to write, e.g. attention.png (.png when no suffix)")
    p.set_defaults(handler=_attention)


def _attention(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import torch

    from vit.explain import METHODS, explain
    from vit.images import describe_error
    from vit.predict import Predictor
    from vit.visualize import attention_figure, model_view
    from vit.weights import load_model

    chosen = {k: v for k, v in (("layer", args.layer), ("head", args.head)) if v is not None}
    fusion = {
        k: v for k, v in (("head_fusion", args.head_fusion), ("discard_ratio", args.discard_ratio)) if v is not None
    }
    method = args.method or ("raw" if chosen else "rollout")
    if chosen and method != "raw":
        raise ValueError("--layer and --head choose a raw attention map; use them with --method raw")
    if fusion and method not in ("rollout", "grad_rollout"):
        raise ValueError(f"--head-fusion and --discard-ratio are options of rollout and grad_rollout, not {method}")
    if args.discard_ratio is not None and not 0 <= args.discard_ratio < 1:
        raise ValueError(f"--discard-ratio {args.discard_ratio} is not in [0, 1)")
    chosen.update(fusion)
    class_specific = METHODS[method][0]  # the gradient methods; the others map every class alike
    if args.target is not None and not class_specific:
        raise ValueError(
            f"--target {args.target}: {method} maps are the same for every class; --target chooses the class of a "
            "gradient method: --method grad_rollout or chefer"
        )
    out = _figure_path(args.out)
    model, checkpoint = load_model(args.checkpoint, args.model)
    if model.num_classes == 0:
        raise ValueError(f"{args.checkpoint}: the model has no classifier head to explain")
    # predict's reading and preprocessing, so that both commands see the same pixels and predict the same class
    if Path(args.image).is_dir():  # argparse's `_source` hands over a str
        raise ValueError(f"{args.image} is a folder: vit attention draws the map of one image file")
    predictor = Predictor(model, class_names=checkpoint.class_names, data_config=checkpoint.data_config)
    try:
        x = predictor.preprocess(args.image)[None]
    except Exception as e:  # as in predict: an input that cannot be read is a failed input (status 1), in one line
        print(f"vit attention: error: {args.image}: {describe_error(e)}", file=sys.stderr)
        return 1
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    predicted = int(probs.argmax())
    index = predicted if args.target is None else args.target
    if not 0 <= index < model.num_classes:
        raise ValueError(f"--target {index} is not a class index of this model (0 to {model.num_classes - 1})")
    heat = explain(model, x, method, target=index if class_specific else None, **chosen)[0]
    shown = model_view(x[0], predictor.data_config)  # the crop the model saw, so the map lines up with it
    lines = [f"predicted: {predictor.label(predicted)} (class {predicted}, p={probs[predicted]:.3f})"]
    if args.target is not None:  # the prediction is still worth knowing when another class is explained
        lines.append(f"target: {predictor.label(index)} (class {index}, p={probs[index]:.3f})")
    options = ", ".join(f"{k} {v}" for k, v in chosen.items())
    figure = attention_figure(shown, heat, title="; ".join(lines), map_title=f"{method} {options}".strip())
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # as `vit export` makes its --out's folders
        figure.savefig(out, dpi=120)
    except OSError as e:  # a read-only folder, a full disk: as `vit export` says it
        raise ValueError(f"{out}: could not write it ({e.strerror or e})") from None
    print(*lines, f"wrote {out}", sep="\n")
    return 0


def _figure_path(out: str) -> Path:
    """The file `savefig(out)` will write, refused up front when it is a folder, lies under a file, or has a format
    matplotlib lacks."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(out)
    if path.is_dir():  # savefig would write '<folder>.png' beside it
        raise ValueError(f"{out} is a folder: give the figure's file name, e.g. {path / 'attention.png'}")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"{out}: {path.parent} is a file, not a folder")
    fmt = path.suffix.lstrip(".").lower()
    if not fmt:  # what savefig does with no suffix, made explicit so that we name the file it writes
        return path.with_name(f"{path.name}.png")
    if fmt not in FigureCanvasBase.get_supported_filetypes():
        raise ValueError(f"{out}: matplotlib cannot write {fmt!r} figures; use .png, .svg or .pdf")
    return path


def _one_line_warning(command: str) -> Callable[..., None]:
    """A `warnings.showwarning` that prints a warning as one line, as an error is, not Python's two with the
    source line."""
    shown: set[str] = set()

    def show(message: Warning | str, *_: Any, **__: Any) -> None:
        # our callbacks' warnings start "vit: " so that they stand out among Lightning's; here the prefix says it
        line = f"vit {command}: warning: {str(message).removeprefix('vit: ')}"
        # Once each: Python's own once-per-place rule forgets what it showed whenever a filter changes (Lightning
        # adds some as it runs), so torch's warning of too many workers came once per loader and again at iter()
        if line not in shown:
            shown.add(line)
            print(line, file=sys.stderr)

    return show


def __getattr__(name: str) -> type:
    if name == "ViTLightningCLI":  # `from vit.cli import ViTLightningCLI` works, lazily
        from vit.lightning_cli import _lightning_cli_class

        return _lightning_cli_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _predict_parser,
    _attention_parser,
    _export_parser,
    _models_parser,
]
LIGHTNING_COMMANDS = ("fit", "validate", "test")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for every subcommand except the LightningCLI ones."""
    from vit import __version__

    parser = argparse.ArgumentParser(prog="vit", description="Vision Transformer toolkit.")
    parser.add_argument("--version", action="version", version=f"vit {__version__}")
    sub = parser.add_subparsers(dest="command")
    for name in LIGHTNING_COMMANDS:  # main() hands these to LightningCLI first: here for --help and the choices
        sub.add_parser(name, help=f"LightningCLI's {name}: vit {name} --config configs/X.yaml (see vit {name} --help)")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vit` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = f"vit {argv[0]}" if argv and not argv[0].startswith("-") else "vit"
    try:
        status = _run(argv)
        CheckedOutput(sys.stdout).flush()  # here rather than at exit, so that a failed write is noticed below
        return status
    except BrokenPipeError:  # the reader has all it wants (`vit predict ... | head`): stop quietly
        stdout_to_devnull()
        return BROKEN_PIPE_STATUS
    except OutputError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        stdout_to_devnull()
        return 1
    except (KeyboardInterrupt, Terminated) as e:  # while torch, timm or Lightning import, say, or an export
        name, number = ("SIGTERM", signal.SIGTERM) if isinstance(e, Terminated) else ("Ctrl-C", signal.SIGINT)
        print(f"{command}: stopped by {name}", file=sys.stderr)
        return 128 + number  # 130 or 143, as `vit predict` stopped mid-run


def _run(argv: list[str]) -> int:
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from vit.lightning_cli import _lightning_main

        return _lightning_main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        # SIGTERM as an exception, as Ctrl-C is: an export's half-written file is removed on the way out
        with warnings.catch_warnings(), sigterm_as_exception():
            warnings.showwarning = _one_line_warning(args.command)
            return args.handler(args)
    except USER_ERRORS as e:
        print(f"vit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
