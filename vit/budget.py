"""`TimeBudget`: a training run that fits a wall-clock budget by shortening its schedule, not by being cut off.

Lightning's `max_time` stops a run wherever it is, with the learning rate still high. This callback instead
measures how long a training step and a validation take, plans the whole epochs that still fit before the
deadline plus as many steps of one more epoch as fit with its validation, and ends the warmup + cosine schedule
(`vit.schedule.WarmupCosine`) at that step, so the weights at the deadline are annealed. It re-plans after every
epoch (the first one pays for compilation and warm-up); the last epoch stops at the planned step and is then
validated as usual. When an epoch overruns the deadline anyway, it stops there. It needs an epoch or two to
measure: when the first epoch already leaves no room, the run ends after it with the learning rate still high.
It prints its plan after the first epoch, and again only when the planned last epoch moves by more than 5%: epoch
times jitter, and a GPU run re-planned every few seconds said so 145 times.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from vit.schedule import WarmupCosine, steps_per_epoch, warn_warmup_outlasts_the_run


class TimeBudget(Callback):
    """Fit training into `minutes` of wall time, counted from when the callback is made (the start of `vit fit`).

    Args:
        minutes: the budget.
        reserve_s: seconds kept back at the end for writing the last checkpoint and the report.
    """

    def __init__(self, minutes: float, reserve_s: float = 5.0):
        self.minutes = minutes
        self.deadline = time.monotonic() + minutes * 60 - reserve_s
        self.epoch_started = self.validation_started = self.validation_s = 0.0
        self.epoch_first_step = 0
        self.most_epochs: int | None = None
        self.stop_at_step: int | None = None  # the planned end inside the last epoch
        self.announced_epochs: int | None = None  # the plan's epoch count, as last printed
        self.warned_warmup = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.most_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_started, self.epoch_first_step, self.validation_s = time.monotonic(), trainer.global_step, 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.validation_started = time.monotonic()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validation_s += time.monotonic() - self.validation_started

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.stop_at_step is not None and trainer.global_step >= self.stop_at_step:
            trainer.should_stop = True  # Lightning validates the partial epoch, then ends the run
        elif trainer.strategy.reduce_boolean_decision(time.monotonic() > self.deadline, all=False):
            trainer.should_stop = True
            rank_zero_info(f"vit: the {self.minutes:g}-minute budget ran out mid-epoch; stopping")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.should_stop:
            return
        now = time.monotonic()
        epoch_s, left_s = now - self.epoch_started, self.deadline - now
        steps = trainer.global_step - self.epoch_first_step
        per_epoch = steps_per_epoch(trainer)
        done = trainer.current_epoch + 1
        whole = max(0, math.floor(left_s / max(epoch_s, 1e-9)))  # epochs, each with its validation
        step_s = max(epoch_s - self.validation_s, 1e-9) / max(steps, 1)
        extra = math.floor((left_s - whole * epoch_s - self.validation_s) / step_s)  # steps of one more epoch
        extra = min(max(extra, 0), per_epoch - 1)
        if self.most_epochs and done + whole >= self.most_epochs:
            whole, extra = self.most_epochs - done, 0
        plan = [done + whole + (extra > 0), trainer.global_step + whole * per_epoch + extra]
        epochs, total_steps = (int(n) for n in trainer.strategy.broadcast(plan, src=0))  # one plan for all ranks
        warmup = 0
        self.stop_at_step = total_steps if extra > 0 else None
        trainer.fit_loop.max_epochs = epochs
        for config in trainer.lr_scheduler_configs:
            for schedule in getattr(config.scheduler, "lr_lambdas", []):
                if isinstance(schedule, WarmupCosine):
                    schedule.total = float(total_steps)
                    warmup = schedule.warmup
        if warmup >= total_steps and not self.warned_warmup:
            self.warned_warmup = True
            warn_warmup_outlasts_the_run(pl_module.hparams.get("warmup_epochs", 0), warmup, total_steps)
        if self.announced_epochs is None or abs(epochs - self.announced_epochs) > 0.05 * self.announced_epochs:
            self.announced_epochs = epochs
            rank_zero_info(
                f"vit: {epoch_s:.1f} s per epoch ({self.validation_s:.1f} s of it validation); training ends at step "
                f"{total_steps}, in epoch {epochs - 1}, to fit the {self.minutes:g}-minute budget"
            )
