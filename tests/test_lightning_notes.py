"""A fit driven from Python (a notebook, a script) shows none of Lightning's notes that ask nothing of the user,
and still shows the rest of what Lightning says."""

from __future__ import annotations

import logging
import warnings

import lightning as L

from vit.data import DigitsDataModule
from vit.module import ViTClassifier

TINY = dict(img_size=8, in_chans=1, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=10)
LEAFSPEC = "`isinstance(treespec, LeafSpec)` is deprecated"
NOTES = ("litlogger", "litmodels", "Loading `train_dataloader` to estimate number of stepping batches")
RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"  # where Lightning's rank_zero_info lines go


def test_a_python_fit_logs_no_lightning_notes_and_warns_no_leafspec_deprecation(tmp_path):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(RANK_ZERO_LOGGER)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:  # the filters in force, as a notebook has them
            trainer = L.Trainer(
                accelerator="cpu",
                max_epochs=1,
                limit_train_batches=2,
                limit_val_batches=1,
                logger=False,
                default_root_dir=tmp_path,  # Lightning's default checkpointing, which brings its own advert
                enable_progress_bar=False,
                enable_model_summary=False,
            )
            trainer.fit(ViTClassifier(model_name=None, model_config=TINY), DigitsDataModule(batch_size=64))
            # the filter is narrow: another warning from the same Lightning module still shows
            warnings.warn_explicit(
                "another note", FutureWarning, "_pytree.py", 1, "lightning.pytorch.utilities._pytree"
            )
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert any(m.startswith("GPU available") for m in messages)  # Lightning's other lines still come through
    assert not [m for m in messages if any(note in m for note in NOTES)]
    shown = [str(w.message) for w in caught]
    assert "another note" in shown
    assert not [m for m in shown if LEAFSPEC in m]
