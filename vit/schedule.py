"""The learning-rate schedule of `vit fit`: linear warmup, then cosine decay (`WarmupCosine`, a LambdaLR multiplier
stepped once per optimiser step), and the warnings about a schedule that does not fit its run: a warmup as long as
the run, a resumed schedule planned for another length, and a `max_time` that cuts the schedule short."""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn


@dataclass
class WarmupCosine:
    """LR multiplier for LambdaLR: linear warmup to 1 over `warmup` steps, then cosine down to `floor` at `total`.
    An object rather than a closure, so that its fields live in the scheduler's state dict and a schedule that
    `vit.budget.TimeBudget` shortened resumes shortened."""

    warmup: int
    total: float
    floor: float

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if not math.isfinite(self.total):  # no known end (time-limited run): hold the peak
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1.0, self.total - self.warmup))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_per_epoch(trainer: L.Trainer) -> int:
    """Optimiser steps (and so schedule steps) in one training epoch."""
    if trainer.train_dataloader is None:  # `estimated_stepping_batches` loads it only when max_epochs bounds the
        trainer.fit_loop.setup_data()  # run: with --trainer.max_epochs -1 it is max_steps, the loader not yet read
    return math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)


def warn_warmup_outlasts_the_run(warmup_epochs: float, warmup: int, total: float) -> None:
    """A run no longer than its warmup (a quick `--trainer.max_epochs 2` of a config that warms up for 3) ends with
    the LR still rising, and so with weights that were never annealed: worth a line, since nothing else shows it."""
    rank_zero_warn(
        f"vit: warmup_epochs {warmup_epochs:g} ({warmup} steps) lasts the whole run ({total:.0f} steps): the LR is "
        f"still rising when training ends and never decays; lower --model.warmup_epochs"
    )


def last_step(trainer: L.Trainer) -> float:
    """The global step at which this run's training ends, counted from where a resumed run goes on (Lightning's
    `estimated_stepping_batches` counts every epoch at the present epoch size, which a resumed run with another
    `limit_train_batches` did not have); inf when nothing bounds it."""
    by_steps = trainer.max_steps if trainer.max_steps >= 0 else math.inf
    if trainer.max_epochs is None or trainer.max_epochs < 0:
        return float(by_steps)
    epochs = trainer.fit_loop.epoch_progress.current
    left = (trainer.max_epochs - trainer.current_epoch) * steps_per_epoch(trainer)
    done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
    if epochs.started > epochs.completed and done < trainer.num_training_batches:  # resumed mid-epoch: Lightning
        left -= math.ceil(done / trainer.accumulate_grad_batches)  # skips the batches done (else reruns the epoch)
    return float(min(by_steps, trainer.global_step + max(0, left)))


def warn_resumed_schedule_misfits(trainer: L.Trainer) -> None:
    """A resumed run keeps the schedule restored from its checkpoint. When that was planned for another length (a
    larger max_epochs, say), say so, since the LR would otherwise sit at its floor, or stop early, unannounced."""
    ckpt = trainer.ckpt_path
    if not ckpt or time_budgeted(trainer):
        return  # a fresh schedule, or one that TimeBudget plans as it goes
    end = last_step(trainer)
    if not math.isfinite(end):
        return
    for config in trainer.lr_scheduler_configs:
        for schedule in getattr(config.scheduler, "lr_lambdas", []):
            if isinstance(schedule, WarmupCosine) and schedule.total != end:
                if end <= schedule.total:
                    after = "it ends before the LR has come down"
                elif schedule.warmup >= end:  # planned for a run shorter than its warmup, as is this one
                    after = f"the LR is still warming up when it ends (until step {schedule.warmup})"
                elif schedule.warmup >= schedule.total:  # the warmup goes on past the planned end, then the floor
                    after = f"the LR warms up until step {schedule.warmup}, then drops to its floor"
                else:
                    after = f"the LR stays at its floor after step {schedule.total:.0f}"
                rank_zero_warn(
                    f"vit: the LR schedule resumed from {ckpt} was planned to end at step {schedule.total:.0f} and "
                    f"this run ends at step {end:.0f}: {after}; for a schedule of its own, start a new run from its "
                    f"weights (--model.pretrained {ckpt})"
                )


def warn_max_time_cuts_the_schedule(trainer: L.Trainer) -> None:
    """`--trainer.max_time` (Lightning's `Timer`) stops training wherever the schedule is, planned as it is for the
    epochs or steps: the weights at the deadline may never have seen the LR come down. `TimeBudget` is the way to
    fit the schedule into the time; say so, since the run itself ends without a word of it."""
    from lightning.pytorch.callbacks import Timer

    if any(isinstance(c, Timer) for c in trainer.callbacks) and not time_budgeted(trainer):
        rank_zero_warn(
            "vit: --trainer.max_time stops training wherever the LR schedule is (it is planned for the epochs or "
            "steps, not the time), so the LR may never come down; to fit the schedule into the time, use "
            "--trainer.callbacks+=vit.budget.TimeBudget --trainer.callbacks.minutes N instead"
        )


def time_budgeted(trainer: L.Trainer) -> bool:
    """Whether `vit.budget.TimeBudget` plans this run's schedule as it goes, so its length is not yet known."""
    from vit.budget import TimeBudget  # here: vit.budget imports this module

    return any(isinstance(c, TimeBudget) for c in trainer.callbacks)
