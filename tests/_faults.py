"""Test-only callbacks that put faults into a real `vit fit` run, passed with `--trainer.callbacks+=` (the tests
put this folder on the subprocess's PYTHONPATH)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class PauseMidEpoch(Callback):
    """At batch `batch` of epoch `epoch`, write the global step to `marker` and sleep, so that a kill sent once
    the marker exists lands mid-epoch, after the previous epoch's checkpoints were written."""

    def __init__(self, marker: str, epoch: int = 1, batch: int = 1, seconds: float = 600.0):
        self.marker, self.epoch, self.batch, self.seconds = Path(marker), epoch, batch, seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            self.marker.write_text(str(trainer.global_step))
            end = time.monotonic() + self.seconds
            # SIGTERM only sets a flag (Lightning acts on it between batches); SIGINT raises out of the sleep
            while time.monotonic() < end and not trainer.received_sigterm:
                time.sleep(0.05)


class InterruptMidEpoch(Callback):
    """Raise KeyboardInterrupt (what Ctrl-C raises) at batch `batch` of epoch `epoch`, in-process."""

    def __init__(self, epoch: int = 1, batch: int = 1):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise KeyboardInterrupt


class _CtrlCWhileDeleted:
    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs here, inside __del__: Python prints 'Exception ignored' and drops it


class CtrlCInAFinalizer(Callback):
    """Ctrl-C (SIGINT to this process) at the end of epoch `epoch`, while an object's `__del__` runs, as when a
    loader iterator left before its end shuts its worker processes down."""

    def __init__(self, epoch: int = 0):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            _CtrlCWhileDeleted()  # made and dropped at once


class RaiseOnRank(Callback):
    """Raise RuntimeError on global rank `rank` when its training reaches global step `step`; every rank writes
    its process id to `pid_dir/<rank>.pid` first, so a test can check that none outlives the command."""

    def __init__(self, rank: int = 1, step: int = 1, pid_dir: str | None = None):
        self.rank, self.step, self.pid_dir = rank, step, pid_dir

    def on_train_start(self, trainer, pl_module) -> None:
        if self.pid_dir:
            (Path(self.pid_dir) / f"{trainer.global_rank}.pid").write_text(str(os.getpid()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"injected fault on rank {self.rank} at step {self.step}")


class RecordRandomDraws(Callback):
    """Writes `<folder>/rank<R>.json`: what each global generator draws as training starts, per rank."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            import json
            import random

            import numpy as np
            import torch

            draws = {"torch": torch.rand(3).tolist(), "numpy": np.random.rand(3).tolist(), "random": random.random()}
            with open(f"{self.folder}/rank{trainer.global_rank}.json", "w") as f:
                json.dump(draws, f)
