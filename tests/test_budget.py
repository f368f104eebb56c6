"""TimeBudget: the schedule is shortened to what fits the wall-clock budget, and the run ends by itself."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback

import vit.budget
from vit.budget import TimeBudget
from vit.data import DigitsDataModule
from vit.module import ViTClassifier
from vit.schedule import WarmupCosine

TINY = dict(img_size=8, in_chans=1, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=10)
BATCHES = 4  # per epoch


class _Clock(Callback):
    """A fake wall clock that moves `seconds` per training batch and `validation_s` per validation (one batch),
    so epoch times are exact; it also counts the validations."""

    def __init__(self, monkeypatch, seconds: float, validation_s: float = 0.0):
        self.now, self.seconds, self.validation_s, self.validations = 0.0, seconds, validation_s, 0
        monkeypatch.setattr(vit.budget.time, "monotonic", lambda: self.now)

    def on_train_batch_start(self, *args) -> None:
        self.now += self.seconds

    def on_validation_batch_start(self, *args) -> None:
        self.now += self.validation_s
        self.validations += 1


def fit_with_budget(
    monkeypatch,
    minutes: float,
    seconds_per_batch: float,
    max_epochs: int = 50,
    validation_s: float = 0.0,
    warmup_epochs: float = 1,
    clock: _Clock | None = None,
):
    clock = clock or _Clock(monkeypatch, seconds_per_batch, validation_s)  # made before the budget, which reads it
    budget = TimeBudget(minutes=minutes, reserve_s=0.0)
    model = ViTClassifier(model_name=None, model_config=TINY, warmup_epochs=warmup_epochs, min_lr_ratio=0.0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        limit_train_batches=BATCHES,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock, budget],
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    trainer.clock = clock
    return trainer


def annealed_at(trainer: L.Trainer, step: int) -> None:
    for schedule in trainer.lr_scheduler_configs[0].scheduler.lr_lambdas:  # one per parameter group
        assert isinstance(schedule, WarmupCosine) and schedule.total == step
        assert schedule(step) == pytest.approx(0.0)  # annealed to the floor at the deadline


def test_the_schedule_ends_at_the_last_step_that_fits_the_budget(monkeypatch):
    # 1 s per batch, 4 batches per epoch, 0.5 minutes: 7 whole epochs and 2 steps of an 8th fit, not 50 epochs
    trainer = fit_with_budget(monkeypatch, minutes=0.5, seconds_per_batch=1.0)
    assert trainer.global_step == 7 * BATCHES + 2 and trainer.clock.now == 30
    annealed_at(trainer, 7 * BATCHES + 2)


def test_the_plan_keeps_time_for_the_last_validation(monkeypatch):
    # epochs of 4 s training + 2 s validation in 33 s: 5 whole epochs (30 s), then 1 step and its validation
    trainer = fit_with_budget(monkeypatch, minutes=33 / 60, seconds_per_batch=1.0, validation_s=2.0)
    assert trainer.global_step == 5 * BATCHES + 1 and trainer.clock.validations == 6 and trainer.clock.now == 33
    annealed_at(trainer, 5 * BATCHES + 1)


def test_a_budget_that_is_not_needed_changes_nothing(monkeypatch):
    trainer = fit_with_budget(monkeypatch, minutes=10, seconds_per_batch=1.0, max_epochs=3)
    assert trainer.current_epoch == 3
    assert {s.total for s in trainer.lr_scheduler_configs[0].scheduler.lr_lambdas} == {3 * BATCHES}


def test_an_epoch_that_overruns_the_budget_stops_mid_epoch(monkeypatch):
    trainer = fit_with_budget(monkeypatch, minutes=2.5 / 60, seconds_per_batch=1.0)  # 2.5 s: the third batch
    assert trainer.global_step == 3  # of the 4 batches of the first epoch, and no other epoch


def test_a_budget_shorter_than_the_warmup_says_the_lr_never_decays(monkeypatch, recwarn):
    # a 2-epoch warmup (8 steps) in a budget of 7.5 s at 1.5 s a batch: one epoch (6 s), then one step more fits
    fit_with_budget(monkeypatch, minutes=7.5 / 60, seconds_per_batch=1.5, warmup_epochs=2)
    said = [str(w.message) for w in recwarn if "warmup_epochs" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("vit: warmup_epochs 2 (8 steps) lasts the whole run (5 steps)")


def test_a_budget_longer_than_the_warmup_says_nothing_of_it(monkeypatch, recwarn):
    fit_with_budget(monkeypatch, minutes=7.5 / 60, seconds_per_batch=1.5, warmup_epochs=1)  # 4 steps of 5
    assert not [w for w in recwarn if "warmup_epochs" in str(w.message)]


class _JitteringClock(_Clock):
    """Batches take `seconds` in even epochs and `seconds * (1 + jitter)` in odd ones; twice that from `slow_from`."""

    def __init__(self, monkeypatch, seconds: float, jitter: float, slow_from: int | None = None):
        super().__init__(monkeypatch, seconds)
        self.base, self.jitter, self.slow_from = seconds, jitter, slow_from

    def on_train_epoch_start(self, trainer, *args) -> None:
        epoch = trainer.current_epoch
        self.seconds = self.base * (1 + self.jitter * (epoch % 2))
        if self.slow_from is not None and epoch >= self.slow_from:
            self.seconds *= 2


def announced_plans(monkeypatch, clock: _Clock, minutes: float) -> list[str]:
    said: list[str] = []
    monkeypatch.setattr(vit.budget, "rank_zero_info", said.append)
    fit_with_budget(monkeypatch, minutes, clock.seconds, max_epochs=1000, clock=clock)
    return [line for line in said if "training ends at step" in line]


def test_the_plan_is_printed_once_when_epoch_times_only_jitter(monkeypatch):
    # 40 epochs of 4-4.12 s in 160 s: each epoch's re-plan moves the end by a step or two, never by 5%
    plans = announced_plans(monkeypatch, _JitteringClock(monkeypatch, 1.0, jitter=0.03), minutes=160 / 60)
    assert len(plans) == 1


def test_the_plan_is_printed_again_when_epochs_slow_down(monkeypatch):
    clock = _JitteringClock(monkeypatch, 1.0, jitter=0.0, slow_from=10)  # 4 s epochs, then 8 s from the 11th
    plans = announced_plans(monkeypatch, clock, minutes=160 / 60)
    assert len(plans) == 2 and "in epoch 39" in plans[0] and "in epoch 24" in plans[1]
