"""`RateLimitedRichProgressBar` updates the training bar by time, and always at an epoch's last batch."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel

from vit.progress import RateLimitedRichProgressBar


def _updates(monkeypatch: pytest.MonkeyPatch, tmp_path, refresh_rate: int) -> list[tuple[int, int]]:
    """(epoch, batch index) of every batch at which the bar did Lightning's update, over 2 epochs of 8 batches."""
    seen: list[tuple[int, int]] = []

    def record(self, trainer, pl_module, outputs, batch, batch_idx):
        seen.append((trainer.current_epoch, batch_idx))

    monkeypatch.setattr(RichProgressBar, "on_train_batch_end", record)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        limit_train_batches=8,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[RateLimitedRichProgressBar(refresh_rate=refresh_rate)],
    )
    trainer.fit(BoringModel())
    return seen


def test_slow_rate_updates_first_and_last_batches_only(monkeypatch, tmp_path):
    # 16 tiny batches take far less than the 10 s between updates
    assert _updates(monkeypatch, tmp_path, refresh_rate=0.1) == [(0, 0), (0, 7), (1, 7)]


def test_fast_rate_updates_every_batch(monkeypatch, tmp_path):
    assert _updates(monkeypatch, tmp_path, refresh_rate=10**9) == [(e, b) for e in range(2) for b in range(8)]


def test_the_bar_shows_no_v_num(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    bar = RateLimitedRichProgressBar()
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=1, logger=CSVLogger(tmp_path), callbacks=[bar],
                        limit_val_batches=0, enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(BoringModel())
    assert "v_num" in RichProgressBar.get_metrics(bar, trainer, trainer.lightning_module)  # Lightning's bar has it
    assert "v_num" not in bar.get_metrics(trainer, trainer.lightning_module)
