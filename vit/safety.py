"""Guards for long runs and untrusted files: checkpoints are checked with `torch.load(weights_only=True)`
before Lightning opens them, a non-finite loss stops training before it reaches the weights, a process that
fails in a multi-process run ends the others instead of leaving them waiting, a run that fails or is stopped
before it writes a checkpoint or a log leaves no run folder behind, and a half precision that this CPU can only
emulate is named before the run crawls."""

from __future__ import annotations

import math
import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from vit import precision
from vit.checkpoint_files import torch_load


class NonFiniteTrainingError(RuntimeError):
    """The training loss or the weights became NaN or infinite; the message names the step."""


def check_checkpoint(path: Any) -> Any:
    """Refuse (CheckpointError, one line naming the file) a local checkpoint that needs more than plain
    weights to unpickle, or whose bytes were damaged after it was written; Lightning's keywords ('last', 'best',
    'hpc', 'registry') and None pass through (None returned). Returns the loaded checkpoint."""
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_file():
        return None  # Lightning resolves the keywords itself, to files we wrote, and reports missing files
    return torch_load(Path(path))  # weights_only=True: raises CheckpointError, never runs the pickle


class StopOnNonFiniteLoss(Callback):
    """Stop at the first NaN/inf training loss, before its backward pass and optimiser step, so the weights
    (and every checkpoint written from them) stay those of the last good step; and never write a checkpoint
    of non-finite weights (a step whose loss was finite can still overflow them)."""

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        value = float(loss.detach())
        if math.isfinite(value):
            return
        raise NonFiniteTrainingError(
            f"the training loss is {value} at step {trainer.global_step} (epoch {trainer.current_epoch}, "
            f"batch {trainer.fit_loop.epoch_loop.batch_idx}); training stopped before this step changed the "
            f"weights; last checkpoint: {_last(trainer)}"
        )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # runs before the file is written: raising here leaves the previous checkpoint as it was
        bad = [k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:
            raise NonFiniteTrainingError(
                f"the weights hold NaN or inf at step {trainer.global_step} (epoch {trainer.current_epoch}), e.g. "
                f"{bad[0]}; the checkpoint was not written; last checkpoint: {_last(trainer)}"
            )


class DropTheRunFolderOfAFailedStart(Callback):
    """A run that fails or is stopped (Ctrl-C, SIGTERM) before it writes a checkpoint or a log (a data folder with
    one class, a head that does not fit, Ctrl-C in the first epoch) would leave runs/<name>/version_N/ holding only
    its config: that folder would push the next run's number up by one, and stand as the latest run, with nothing to
    resume, when `--ckpt_path last` looks for one. Remove such a folder, and only when it holds nothing but the files
    a start writes; `removed` is then its path. A folder with logs (metrics.csv) stays: they are the only record of
    the steps that run trained."""

    START_FILES = frozenset({"config.yaml", "hparams.yaml"})

    def __init__(self) -> None:
        self.saved = False  # whether this run wrote (or began to write) a checkpoint, wherever its dirpath is
        self.removed: str | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.saved = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not trainer.is_global_zero or self.saved or trainer.logger is None:
            return
        log_dir = getattr(trainer.logger, "log_dir", None)  # not trainer.log_dir: a collective, here after a failure
        if not log_dir or not Path(log_dir).is_dir():
            return  # no folder yet: saving the logs now would make one
        # Lightning saves what it logs at once, but rows logged through `logger.log_metrics` wait in memory (for
        # CSVLogger's 100th step, or its save after this hook): save them first, so that their folder stays
        try:
            for logger in trainer.loggers:
                logger.save()
        except Exception:
            return  # Lightning's own save, next, reports it; a folder whose logs are uncertain stays
        if drop_a_run_folder_that_only_started(log_dir):
            self.removed = log_dir


def drop_a_run_folder_that_only_started(log_dir: str | None) -> bool:
    """Remove a run folder that holds only the files a start writes (config.yaml, hparams.yaml); whether it did."""
    folder = Path(log_dir) if log_dir else None
    if folder is None or not folder.is_dir() or folder.resolve() == Path.cwd().resolve():
        return False  # never the folder the command runs in, whatever a logger or callback takes for its run folder
    names = {f.name for f in folder.iterdir()}
    if not names <= DropTheRunFolderOfAFailedStart.START_FILES:
        return False
    for name in names:
        (folder / name).unlink()
    folder.rmdir()
    return True


class EndAllRanksOnError(Callback):
    """When the launching process (rank 0) of a single-node DDP run fails, kill the ranks it started at once.

    Lightning kills everything when a child rank exits with an error (its process observer) and on Ctrl-C, but
    not when rank 0 raises: the children would sit in their next collective until the backend notices (gloo: a
    closed socket; NCCL: the process-group timeout, 30 minutes by default) and outlive the command. Ranks started
    by torchrun or SLURM are ended by those launchers (`srun --kill-on-bad-exit=1`)."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

        launcher = getattr(trainer.strategy, "launcher", None)
        if isinstance(launcher, _SubprocessScriptLauncher) and launcher.procs:
            launcher.kill(signal.SIGKILL)  # they may be blocked inside a collective, where SIGTERM waits
            for proc in launcher.procs:
                proc.wait()


class CtrlCIsNeverLost(Callback):
    """Ctrl-C that lands in a finalizer is dropped by Python ('Exception ignored in ... __del__'), and training went
    on to its end with status 0: a loader iterator left before its end (`limit_train_batches`, the sanity check,
    a time budget) shuts its worker processes down in `__del__`, for up to seconds at each epoch's end. Note every
    SIGINT, and raise it again where the next batch or validation begins: Lightning stops as for any Ctrl-C."""

    def __init__(self) -> None:
        self._pending = False
        self._handlers: tuple[Any, Any] | None = None  # (ours, the one it wraps)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        wrapped = signal.getsignal(signal.SIGINT)
        if not callable(wrapped) or threading.current_thread() is not threading.main_thread():
            return  # SIGINT ignored (a background job) or left to the OS: nothing is raised to be lost

        def noted(signum: int, frame: Any) -> None:
            self._pending = True
            wrapped(signum, frame)

        signal.signal(signal.SIGINT, noted)
        self._handlers = (noted, wrapped)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._handlers is not None and signal.getsignal(signal.SIGINT) is self._handlers[0]:
            signal.signal(signal.SIGINT, self._handlers[1])
        self._handlers = None

    def _raise_a_lost_ctrl_c(self, *_: Any) -> None:
        if self._pending:
            self._pending = False
            raise KeyboardInterrupt

    # where work begins, not at an epoch's end: its checkpoint is written first (checkpoint callbacks come last)
    on_train_epoch_start = on_train_batch_start = on_validation_start = on_validation_batch_start = _raise_a_lost_ctrl_c


CPU_HALF_PRECISIONS = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-true": torch.float16}


class WarnIfHalfPrecisionIsSlow(Callback):
    """Warn once at setup when a CPU run asks for bf16-mixed, bf16-true or 16-true and this CPU multiplies
    matrices in that type more slowly than in float32 (`vit.precision`). Only AMX makes bfloat16 pay on a CPU:
    `benchmarks/speed.py`'s training step ran 1.6x as fast as float32 with it, and 0.7x (AVX-512 BF16 only),
    0.3x (AVX-512) and 0.04x (AVX2) without, so `configs/cifar10_cpu.yaml` would spend its time budget crawling."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dtype = CPU_HALF_PRECISIONS.get(str(trainer.precision))
        if dtype is None or trainer.strategy.root_device.type != "cpu":
            return
        slow = precision.slow_on_this_cpu(dtype)
        if slow:
            rank_zero_warn(f"vit: precision {trainer.precision} is slow here: {slow}; pass --trainer.precision 32-true")


def _last(trainer: L.Trainer) -> str:
    # `vit fit` keeps last.ckpt with an unmonitored ModelCheckpoint (its best is the latest); others use save_last
    paths = [cb.best_model_path if cb.monitor is None else cb.last_model_path for cb in trainer.checkpoint_callbacks]
    return next((p for p in reversed(paths) if p), "none written yet")
