"""The `vit` command. fit / validate / test are LightningCLI; the other subcommands are small argparse
front ends over the library (`vit.predict`, `vit.explain`, `vit.weights`).

User errors (a missing file, a bad checkpoint, a bad option) print one line and exit with status 2; they
never print a traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

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
    """fit / validate / test through `ViTLightningCLI`; user errors become one line and status 2."""
    import warnings

    # We choose the loader processes on purpose (none for in-memory data, cores - 1 otherwise).
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    try:
        _lightning_cli_class()(args=argv)
    except SystemExit as e:  # jsonargparse's own errors and --help / --print_config
        return e.code if isinstance(e.code, int) else 2
    except USER_ERRORS as e:
        print(f"vit {argv[0]}: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


@functools.cache
def _lightning_cli_class() -> type:
    """`ViTLightningCLI`, defined on first use so that the light subcommands do not import Lightning (seconds)."""
    from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch.loggers import CSVLogger

    from vit.data import VisionDataModule
    from vit.module import ViTClassifier

    class ViTLightningCLI(LightningCLI):
        """LightningCLI for `ViTClassifier` and any `vit.data` module: each run writes runs/<name>/version_N/
        with CSV logs and checkpoints/best.ckpt + last.ckpt, and ends by printing where and how it went."""

        def __init__(self, args: list[str]):
            super().__init__(
                ViTClassifier,
                VisionDataModule,
                subclass_mode_data=True,
                trainer_defaults={
                    "logger": {
                        "class_path": f"{CSVLogger.__module__}.CSVLogger",
                        "init_args": {"save_dir": "runs", "name": "vit"},
                    }
                },
                save_config_kwargs={"overwrite": True},
                args=args,
            )

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_argument(
                "--torch_threads",
                type=int | None,
                default=None,
                help="CPU threads for torch (torch.set_num_threads); tiny models train fastest with 1, above all "
                "on a busy machine. Default: torch's choice.",
            )
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults(
                {
                    "checkpoint.monitor": "val/acc",
                    "checkpoint.mode": "max",
                    "checkpoint.filename": "best",
                    "checkpoint.save_last": True,
                    "checkpoint.auto_insert_metric_name": False,
                }
            )

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            """Lightning's Rich bar unless the config has a progress bar of its own or turns bars off."""
            config = self._get(self.config_init, "trainer", default={})
            callbacks = config.get("callbacks") or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            wants_bar = config.get("enable_progress_bar") is not False
            if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
                kwargs["callbacks"] = [*callbacks, RichProgressBar()]
            return super().instantiate_trainer(**kwargs)

        def before_instantiate_classes(self) -> None:
            import torch

            threads = self.config[self.subcommand].get("torch_threads")
            if threads:
                torch.set_num_threads(threads)

        def after_fit(self) -> None:
            self._report(fitted=True)

        def after_validate(self) -> None:
            self._report()

        def after_test(self) -> None:
            self._report()

        def _report(self, fitted: bool = False) -> None:
            from rich.console import Console

            trainer = self.trainer
            console = Console(stderr=False)
            console.print(f"run folder: {trainer.log_dir}")
            if fitted:
                ckpt = trainer.checkpoint_callback
                console.print(f"checkpoints: best {ckpt.best_model_path}  last {ckpt.last_model_path}")
                metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items())}
                console.print("final metrics: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    return ViTLightningCLI


def __getattr__(name: str) -> type:
    if name == "ViTLightningCLI":  # `from vit.cli import ViTLightningCLI` works, lazily
        return _lightning_cli_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
