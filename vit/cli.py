"""The `vit` command. fit / validate / test are LightningCLI; the other subcommands are small argparse
front ends over the library (`vit.predict`, `vit.explain`, `vit.weights`).

User errors (a missing file, a bad checkpoint, a bad option) print one line and exit with status 2; they
never print a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from vit.weights import CheckpointError

USER_ERRORS = (CheckpointError, FileNotFoundError, ValueError)


def _models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model variants")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'vit_small*'")
    p.set_defaults(handler=_models)


def _models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from vit.factory import list_models, model_config

    names = list_models(args.pattern)
    if not names:
        raise ValueError(f"no model matches {args.pattern!r}")
    table = Table("name", "params (M)", "input", "patch", "dim", "depth", "heads", box=None)
    for name in names:
        cfg = model_config(name)
        table.add_row(
            name,
            f"{_count_params(cfg) / 1e6:.1f}",
            "x".join(map(str, cfg.img_hw)),
            str(cfg.patch_size),
            str(cfg.embed_dim),
            str(cfg.depth),
            str(cfg.num_heads),
        )
    Console(width=120).print(table)
    return 0


def _count_params(cfg) -> int:
    import torch

    from vit.model import VisionTransformer

    with torch.device("meta"):  # shapes only: no memory, no init time, even for ViT-H
        return sum(p.numel() for p in VisionTransformer(cfg).parameters())


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify image files or folders of them (searched recursively)")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="image files and folders")
    p.add_argument("--checkpoint", "-c", required=True, help="a .ckpt, a weights file or folder, or a timm tag")
    p.add_argument("--topk", type=_positive_int, default=5, help="how many classes to report per image")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    p.add_argument("--num-workers", type=int, default=None, help="decoding processes (default: by core count)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    from vit.predict import Predictor, write_results

    predictor = Predictor.from_checkpoint(
        args.checkpoint, device=args.device, batch_size=args.batch_size, num_workers=args.num_workers
    )
    results = predictor.predict(args.sources, topk=args.topk, progress=False if args.quiet else None)
    write_results(results, args.format, sys.stdout)
    failed = sum(r["error"] is not None for r in results)
    if failed:
        print(f"vit predict: {failed} of {len(results)} inputs could not be classified", file=sys.stderr)
    return 1 if failed else 0


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a checkpoint as ONNX or safetensors")
    p.add_argument("--checkpoint", "-c", required=True, help="a .ckpt, a weights file or folder, or a timm tag")
    p.add_argument("--format", choices=("onnx", "safetensors"), help="default: from the suffix of --out")
    p.add_argument("--out", "-o", required=True, help="the file to write")
    p.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vit.export import FORMATS, export_checkpoint, onnx_logit_difference

    fmt = args.format or Path(args.out).suffix.lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"cannot tell the format from {args.out!r}: give --format onnx or --format safetensors")
    model, out = export_checkpoint(args.checkpoint, fmt, args.out)
    note = ""
    if fmt == "onnx":
        try:
            note = f"; onnxruntime logits within {onnx_logit_difference(model, out):.1e} of torch's"
        except ImportError:
            note = "; onnxruntime is not installed, so the file was not checked"
    print(f"wrote {out} ({fmt}{note})")
    return 0


def _lightning_main(argv: list[str]) -> int:
    raise NotImplementedError("fit/validate/test arrive with the training issue")  # TODO(issue 3)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_predict_parser, _export_parser, _models_parser]
LIGHTNING_COMMANDS = ("fit", "validate", "test")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for every subcommand except the LightningCLI ones."""
    parser = argparse.ArgumentParser(prog="vit", description="Vision Transformer toolkit.")
    sub = parser.add_subparsers(dest="command", metavar="{fit,validate,test,predict,attention,export,models}")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vit` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        return _lightning_main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except USER_ERRORS as e:
        print(f"vit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
