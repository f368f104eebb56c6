"""`TimeBudget`: a training run that fits a wall-clock budget by shortening its schedule, not by being cut off.

Lightning's `max_time` stops a run wherever it is, with the learning rate still high. This callback instead
measures how long an epoch takes (training plus validation), sets `max_epochs` to what still fits before the
deadline, and ends the warmup + cosine schedule (`vit.module.WarmupCosine`) at that epoch, so the weights at the
deadline are annealed. It re-estimates after every epoch (the first one pays for compilation and warm-up) and
stops mid-epoch only when an epoch overruns the deadline. It needs a few epochs to work with: when the first
epoch already leaves no room for a second, the run ends after it with the learning rate still high.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from vit.module import WarmupCosine


class TimeBudget(Callback):
    """Fit training into `minutes` of wall time, counted from when the callback is made (the start of `vit fit`).

    Args:
        minutes: the budget.
        reserve_s: seconds kept back at the end for writing the last checkpoint and the report.
    """

    def __init__(self, minutes: float, reserve_s: float = 5.0):
        self.minutes = minutes
        self.deadline = time.monotonic() + minutes * 60 - reserve_s
        self.epoch_started = 0.0
        self.most_epochs: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.most_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_started = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.strategy.reduce_boolean_decision(time.monotonic() > self.deadline, all=False):
            trainer.should_stop = True
            rank_zero_info(f"vit: the {self.minutes:g}-minute budget ran out mid-epoch; stopping")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = time.monotonic()
        epoch_s, left_s = now - self.epoch_started, self.deadline - now
        done = trainer.current_epoch + 1
        fits = done + max(0, math.floor(left_s / max(epoch_s, 1e-9)))
        fits = min(fits, self.most_epochs) if self.most_epochs else fits
        fits = int(trainer.strategy.broadcast(fits, src=0))  # every rank must stop at the same epoch
        if fits == trainer.max_epochs:
            return
        trainer.fit_loop.max_epochs = fits
        steps_per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        for config in trainer.lr_scheduler_configs:
            for schedule in getattr(config.scheduler, "lr_lambdas", []):
                if isinstance(schedule, WarmupCosine):
                    schedule.total = float(fits * steps_per_epoch)
        rank_zero_info(f"vit: {epoch_s:.1f} s per epoch; {fits} epochs fit the {self.minutes:g}-minute budget")
