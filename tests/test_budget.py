"""TimeBudget: the schedule is shortened to what fits the wall-clock budget, and the run ends by itself."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback

import vit.budget
from vit.budget import TimeBudget
from vit.data import DigitsDataModule
from vit.module import ViTClassifier, WarmupCosine

TINY = dict(img_size=8, in_chans=1, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=10)
BATCHES = 4  # per epoch


class _Clock(Callback):
    """A fake wall clock that moves `seconds` per training batch, so epoch times are exact."""

    def __init__(self, monkeypatch, seconds: float):
        self.now, self.seconds = 0.0, seconds
        monkeypatch.setattr(vit.budget.time, "monotonic", lambda: self.now)

    def on_train_batch_start(self, *args) -> None:
        self.now += self.seconds


def fit_with_budget(monkeypatch, minutes: float, seconds_per_batch: float, max_epochs: int = 50):
    clock = _Clock(monkeypatch, seconds_per_batch)  # before the budget, which reads the clock when made
    budget = TimeBudget(minutes=minutes, reserve_s=0.0)
    model = ViTClassifier(model_name=None, model_config=TINY, warmup_epochs=1, min_lr_ratio=0.0)
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
    return trainer


def test_the_schedule_ends_at_the_last_epoch_that_fits_the_budget(monkeypatch):
    # 1 s per batch, 4 batches per epoch, 0.5 minutes: 7 whole epochs fit, not the 50 asked for
    trainer = fit_with_budget(monkeypatch, minutes=0.5, seconds_per_batch=1.0)
    assert trainer.current_epoch == 7 and trainer.global_step == 7 * BATCHES
    for schedule in trainer.lr_scheduler_configs[0].scheduler.lr_lambdas:  # one per parameter group
        assert isinstance(schedule, WarmupCosine) and schedule.total == 7 * BATCHES
        assert schedule(trainer.global_step) == pytest.approx(0.0)  # annealed to the floor at the deadline


def test_a_budget_that_is_not_needed_changes_nothing(monkeypatch):
    trainer = fit_with_budget(monkeypatch, minutes=10, seconds_per_batch=1.0, max_epochs=3)
    assert trainer.current_epoch == 3
    assert {s.total for s in trainer.lr_scheduler_configs[0].scheduler.lr_lambdas} == {3 * BATCHES}


def test_an_epoch_that_overruns_the_budget_stops_mid_epoch(monkeypatch):
    trainer = fit_with_budget(monkeypatch, minutes=2.5 / 60, seconds_per_batch=1.0)  # 2.5 s: the third batch
    assert trainer.global_step == 3  # of the 4 batches of the first epoch, and no other epoch
