"""What `vit fit`'s machinery costs: images/s of `vit fit` against a plain PyTorch loop doing the same training,
interleaved in one process.

    python benchmarks/loop_overhead.py                         # digits, then a temporary ImageFolder
    python benchmarks/loop_overhead.py --data-dir DIR          # ImageFolder: DIR/<class>/<image> instead
    python benchmarks/loop_overhead.py --quick                 # seconds: keeps the script from rotting

"lightning" is `vit fit` itself: `ViTLightningCLI` with the setting's config (configs/digits.yaml, or
configs/imagefolder.yaml on a folder of 32x32 JPEGs), so the same callbacks (last.ckpt every epoch, the
non-finite-loss guard, the Rich progress bar, drawn as on a terminal), CSV logging, LR schedule, EMA and
augmentation as a user's run; only validation is off (`--trainer.limit_val_batches 0`), since the plain loop
does none. "plain" is the loop a user would write: the same model built by `vit.create_model`, AdamW (fused,
as `vit fit` builds it), the same loss, batch size, threads and number of steps, fed the same training batches:
the digits tensors indexed directly and augmented by the data module's own `batch_augment` (as `vit fit`
augments them), or the data module's own train loader (same workers and transforms) for the ImageFolder.
"Lightning alone" runs the plain loop's model, optimizer, loss and batches as a minimal LightningModule under a
Trainer without logger, checkpoints, progress bar or callbacks: what Lightning itself costs, the floor for
`vit fit`. The first epoch of every run is warm-up; the clock runs from the start of the second epoch to the
end of training (Lightning's last checkpoint included). Each round runs every side once, in rotating order, and
each ratio is the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's `vit`, installed or not
from common import image_folder, parse_args, ratio_spread  # noqa: E402

import vit  # noqa: E402

DEFAULT_THREADS = torch.get_num_threads()
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def read_config(name: str) -> dict[str, Any]:
    """configs/<name>.yaml as a dict."""
    return yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())


def config_model(config: dict[str, Any], num_classes: int) -> torch.nn.Module:
    """The model a config's `model:` section describes, built by `vit.create_model`."""
    m = config["model"]
    return vit.create_model(
        m["model_name"], img_size=m.get("img_size"), num_classes=num_classes, **(m.get("model_overrides") or {})
    )


def config_threads(config: dict[str, Any]) -> int:
    """The torch threads `vit fit` runs with under this config (its `torch_threads`, else torch's default)."""
    return config.get("torch_threads") or DEFAULT_THREADS


def random_image_folder(root: Path, classes: int, per_class: int, size: int = 32, seed: int = 0) -> Path:
    """root/<class>/<i>.jpg: random RGB JPEGs (smooth noise, so they compress like photos, not like static)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            small = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((size, size), Image.BICUBIC)
            image.save(root / f"class_{c}" / f"{i}.jpg", quality=90)
    return root


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, ls: float
) -> None:
    """One plain training step: forward, label-smoothed cross-entropy, backward, AdamW."""
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y, label_smoothing=ls).backward()
    optimizer.step()


def plain_optimizer(model: torch.nn.Module, config: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW with the config's LR and weight decay, fused as `ViTClassifier.build_optimizer` makes it."""
    m = config["model"]
    return torch.optim.AdamW(model.parameters(), lr=m["lr"], weight_decay=m["weight_decay"], fused=True)


# ------------------------------------------------------------------------------------------------ lightning
class _Clock:
    """Filled by the callback the timed CLI adds: wall and CPU seconds, images, from the start of epoch 1 to the end."""

    start = end = cpu_start = cpu_end = 0.0
    images = 0


def _clock_callback() -> Any:
    """A callback that fills `_Clock` (reset) from the start of epoch 1 to the end of training."""
    from lightning.pytorch.callbacks import Callback

    class ClockCallback(Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch == 1:
                _Clock.start, _Clock.cpu_start = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.current_epoch >= 1:
                _Clock.images += len(batch[0])

        def on_train_end(self, trainer, pl_module) -> None:
            _Clock.end, _Clock.cpu_end = time.perf_counter(), time.process_time()

    _Clock.start = _Clock.end = _Clock.cpu_start = _Clock.cpu_end = 0.0
    _Clock.images = 0
    return ClockCallback()


def _clock_rates() -> tuple[float, float]:
    """Images per wall second and per CPU second that the clock saw."""
    return _Clock.images / (_Clock.end - _Clock.start), _Clock.images / (_Clock.cpu_end - _Clock.cpu_start)


def _timed_cli_class() -> type:
    from vit.lightning_cli import _lightning_cli_class

    class TimedCLI(_lightning_cli_class()):
        """`vit fit`'s CLI plus the clock, which runs after every other callback."""

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            trainer = super().instantiate_trainer(**kwargs)
            trainer.callbacks.append(_clock_callback())
            return trainer

    return TimedCLI


@contextlib.contextmanager
def _as_on_a_terminal() -> Iterable[None]:
    """Rich draws its bar as on a terminal (TTY_COMPATIBLE=1), into /dev/null; Lightning's chatter is muted."""
    before = os.environ.get("TTY_COMPATIBLE")
    os.environ["TTY_COMPATIBLE"] = "1"
    for name in ("lightning.pytorch", "lightning.fabric"):  # their handlers hold the real stderr
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with (
            open(os.devnull, "w") as null,
            contextlib.redirect_stdout(null),
            contextlib.redirect_stderr(null),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        if before is None:
            os.environ.pop("TTY_COMPATIBLE", None)
        else:
            os.environ["TTY_COMPATIBLE"] = before


def lightning_run(setting: Setting, epochs: int, work: Path) -> tuple[tuple[float, float], Any]:
    """`vit fit` for `epochs` epochs; ((images per wall second, per CPU second) after the first epoch, the CLI)."""
    torch.set_num_threads(setting.threads)
    argv = ["fit", "--config", str(ROOT / "configs" / f"{setting.name}.yaml"), *setting.cli_args]
    argv += ["--trainer.max_epochs", str(epochs), "--trainer.limit_val_batches", "0"]
    argv += ["--trainer.num_sanity_val_steps", "0", "--trainer.logger.init_args.save_dir", str(work)]
    if setting.batches:
        argv += ["--trainer.limit_train_batches", str(setting.batches)]
    with _as_on_a_terminal():
        cli = setting.cli_class(args=argv)
    if cli.trainer.current_epoch != epochs:
        raise SystemExit(f"vit fit stopped at epoch {cli.trainer.current_epoch} of {epochs}")
    return _clock_rates(), cli


# ---------------------------------------------------------------------------------------------------- plain
@contextlib.contextmanager
def _without_lightning_env() -> Iterable[None]:
    """The process as plain PyTorch leaves it: importing Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1, under which
    every `torch.cuda.is_available()` (AdamW asks once per step) loads NVML anew."""
    before = os.environ.pop(NVML_CHECK, None)
    try:
        yield
    finally:
        if before is not None:
            os.environ[NVML_CHECK] = before


def plain_run(setting: Setting, epochs: int) -> tuple[float, float]:
    """The plain loop for `epochs` epochs; images per wall second and per CPU second after the first epoch."""
    with _without_lightning_env():
        return _plain_run(setting, epochs)


def _plain_run(setting: Setting, epochs: int) -> tuple[float, float]:
    torch.set_num_threads(setting.threads)
    model = config_model(setting.config, setting.num_classes).train()
    optimizer = plain_optimizer(model, setting.config)
    ls = setting.config["model"]["label_smoothing"]
    images, start, cpu_start = 0, 0.0, 0.0
    for epoch in range(epochs):
        if epoch == 1:
            start, cpu_start = time.perf_counter(), time.process_time()
        for x, y in setting.batches_of_epoch():
            train_step(model, optimizer, x, y, ls)
            images += len(x) if epoch >= 1 else 0
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu_start)


# ------------------------------------------------------------------------------------------ Lightning alone
def bare_run(setting: Setting, epochs: int) -> tuple[float, float]:
    """The plain loop's training as a minimal LightningModule under a bare Trainer; images per wall second and per
    CPU second after the first epoch."""
    import lightning as L

    class PlainModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = config_model(setting.config, setting.num_classes)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            ls = setting.config["model"]["label_smoothing"]
            return F.cross_entropy(self.model(batch[0]), batch[1], label_smoothing=ls)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return plain_optimizer(self.model, setting.config)

    class Epochs:  # the plain loop's batches, anew each epoch
        def __iter__(self) -> Any:
            return iter(setting.batches_of_epoch())

        def __len__(self) -> int:
            return setting.batches_per_epoch()

    torch.set_num_threads(setting.threads)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_clock_callback()],
    )
    with _without_lightning_env(), _as_on_a_terminal():
        trainer.fit(PlainModule(), train_dataloaders=Epochs())
    return _clock_rates()


class Setting:
    """A config, the CLI arguments that point it at its data, and the plain loop's view of the same data."""

    def __init__(self, name: str, cli_args: list[str], batches: int | None, batch_size: int | None):
        self.name, self.config, self.batches = name, read_config(name), batches
        self.cli_args = cli_args + (["--data.batch_size", str(batch_size)] if batch_size else [])
        self.threads = config_threads(self.config)
        self.cli_class = _timed_cli_class()
        self.num_classes = 0
        self.datamodule: Any = None

    def adopt(self, cli: Any) -> None:
        """Take the class count and the set-up data module from a finished `vit fit` run."""
        self.num_classes = cli.model.model.num_classes
        self.datamodule = cli.datamodule
        if self.datamodule.in_memory:  # the tensors the data module holds, indexed directly
            train = self.datamodule.datasets["train"]
            self.x, self.y, self.finish = *train.cached, train.finish  # (N, C, H, W) uint8, (N,); normalises
        else:  # the data module's own loader (same workers and transforms)
            self.loader = self.datamodule.train_dataloader()

    def batches_per_epoch(self) -> int:
        """How many training batches `vit fit` takes per epoch (full batches, `limit_train_batches`)."""
        limit = self.batches or float("inf")
        if self.datamodule.in_memory:
            return int(min(limit, len(self.x) // self.datamodule.hparams.batch_size))
        return int(min(limit, len(self.loader)))

    def batches_of_epoch(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of training batches, as many as `vit fit` takes."""
        limit = self.batches or float("inf")
        if self.datamodule.in_memory:
            b = self.datamodule.hparams.batch_size
            order = torch.randperm(len(self.x))
            for i in range(self.batches_per_epoch()):
                idx = order[i * b : (i + 1) * b]
                x = self.finish(self.x[idx])  # as the loader hands a batch out
                yield self.datamodule.batch_augment(x), self.y[idx]  # `vit fit`'s whole-batch augmentation
        else:
            for i, batch in enumerate(self.loader):
                if i >= limit:
                    break
                yield batch[0], batch[1]


def summary(name: str, what: str, plain: list[float], other: list[float], label: str) -> str:
    """One line: median images/s of each side and the per-round ratio other/plain (median, quartiles, range)."""
    ratios = [o / p for p, o in zip(plain, other)]
    return (
        f"{name:11s} {what:4s} plain {statistics.median(plain):7.1f} img/s  {label} {statistics.median(other):7.1f}"
        f" img/s  {label}/plain {ratio_spread(ratios)}"
    )


def compare(setting: Setting, rounds: int, epochs: int, work: Path, warmup: bool = True) -> list[str]:
    """A warm-up run of `vit fit` (which also yields the data), then `rounds` rounds of all three sides in rotating
    order; without the warm-up, the first round's `vit fit` goes first and yields the data."""
    if warmup:
        setting.adopt(lightning_run(setting, 2, work)[1])
    sides = ["plain", "bare", "vit fit"]
    rates: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
    for r in range(rounds):
        order = sides[r % 3 :] + sides[: r % 3]
        if setting.datamodule is None:  # the first `vit fit` yields the data the others are fed
            order = ["vit fit", *(side for side in order if side != "vit fit")]
        for side in order:
            if side == "plain":
                rates[side].append(plain_run(setting, epochs))
            elif side == "bare":
                rates[side].append(bare_run(setting, epochs))
            else:
                rate, cli = lightning_run(setting, epochs, work)
                rates[side].append(rate)
                if setting.datamodule is None:
                    setting.adopt(cli)
        print(f"  round {r}: wall img/s " + "  ".join(f"{side} {rates[side][-1][0]:.1f}" for side in sides), flush=True)
    return [
        summary(setting.name, what, [p[i] for p in rates["plain"]], [o[i] for o in rates[side]], label)
        for side, label in (("vit fit", "vit fit"), ("bare", "Lightning alone"))
        for i, what in enumerate(("wall", "cpu"))
    ]


def main(argv: list[str] | None = None) -> int:
    """Print vit fit/plain and Lightning alone/plain images/s for digits and for an ImageFolder of 32x32 JPEGs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=["digits", "imagefolder"], default=["digits", "imagefolder"])
    parser.add_argument("--rounds", type=int, default=5, help="runs of each side per setting")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is warm-up")
    parser.add_argument(
        "--data-dir", type=image_folder, help="ImageFolder setting: DIR/<class>/<image> (default: random)"
    )
    parser.add_argument("--images", type=int, default=1000, help="random ImageFolder: images (10 classes)")
    parser.add_argument("--batches", type=int, help="training batches per epoch (default: the whole split)")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test: 1 round, no warm-up run, 2 epochs of 2 small batches"
    )
    args = parse_args(parser, argv, rounds=1, epochs=2, batches=2, images=60)
    if args.epochs < 2 or args.rounds < 1:
        parser.error("--epochs must be 2 or more (the first epoch of every run is warm-up) and --rounds 1 or more")
    batch_size = 8 if args.quick else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads by default, float32 CPU")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.settings:
            cli_args = []
            if name == "imagefolder":
                folder = args.data_dir or random_image_folder(work / "images", 10, max(2, args.images // 10))
                cli_args = ["--data.train_dir", str(folder)]
            setting = Setting(name, cli_args, args.batches, batch_size)
            print(f"{name}: configs/{name}.yaml, {setting.threads} torch thread(s)", flush=True)
            print("\n".join(compare(setting, args.rounds, args.epochs, work, not args.quick)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
