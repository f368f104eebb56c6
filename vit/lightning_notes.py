"""Lightning's notes that ask nothing of a vit user, silenced narrowly (a logger and a message, or a warning's
category, message and module) for the command line, scripts and notebooks alike. Importing `vit.datamodule`
(which `vit.data` and `vit.module` do) calls `silence_lightning_notes`, and so do `vit fit | validate | test` and the
`setup` of our modules at each run: a `warnings.catch_warnings` around the import (pytest's collection, say) undoes
a filter."""

from __future__ import annotations

import logging
import warnings

RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"  # where Lightning's rank_zero_info lines go
NOTES = (
    "try installing [litlogger]",  # adverts for Lightning's cloud logger, at every Trainer,
    "try installing [litmodels]",  # and for its model registry, at a fit with Lightning's default checkpointing
    "Loading `train_dataloader` to estimate number of stepping batches",  # our LR schedule asks for the count
)


def _not_a_note(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(note in message for note in NOTES)


def silence_lightning_notes() -> None:
    """Drop the log lines in `NOTES` and two warnings from Lightning's internals; calling it again changes nothing."""
    logging.getLogger(RANK_ZERO_LOGGER).addFilter(_not_a_note)  # added once: the same function is not added twice
    # Lightning's pytree helper builds a LeafSpec, which torch 2.10+ deprecates (fixed in Lightning, not by us)
    warnings.filterwarnings(
        "ignore",
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        r"lightning\.pytorch\.utilities\._pytree",
    )
    # The summary's size estimate for a mixed precision "falls back" to 32 bits, which is what such weights are
    warnings.filterwarnings(
        "ignore", r"Precision (bf)?16-mixed is not supported by the model summary", UserWarning, r"lightning\.pytorch"
    )
