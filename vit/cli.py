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


def _lightning_main(argv: list[str]) -> int:
    raise NotImplementedError("fit/validate/test arrive with the training issue")  # TODO(issue 3)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_models_parser]
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
