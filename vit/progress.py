"""`RateLimitedRichProgressBar`: Lightning's Rich bar, updated by time rather than after every training batch.

Lightning's bar gathers the logged metrics, converts them and updates its tasks after each batch; with its
redraws that came to about 1.7 ms a batch, 7% of a 24 ms digits step (`benchmarks/loop_overhead.py`, bar on
against off). Updated at most `refresh_rate` times a second, it looks the same and costs less.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class RateLimitedRichProgressBar(RichProgressBar):
    """`RichProgressBar` whose training bar and metrics follow the batches at most `refresh_rate` times a second
    (and always at an epoch's last batch); validation and test bars are Lightning's."""

    def __init__(self, refresh_rate: float = 4, **kwargs: Any):
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self._next_update = 0.0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.monotonic()
        if now < self._next_update and batch_idx + 1 != self.total_train_batches:
            return
        self._next_update = now + (1 / self.refresh_rate if self.refresh_rate > 0 else 0.0)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The logged metrics, without Lightning's `v_num` (the run's version, which Rich shows as 0.000)."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
