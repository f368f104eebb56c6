"""Resuming `vit fit`: checkpoints that carry the random-number generators of every rank and reach the disk whole;
and the checkpoint callbacks (best.ckpt, which a tie moves on; last.ckpt, at a bounded share of the run's time;
where to resume from after Ctrl-C). What `--ckpt_path` finds and means is `vit.ckpt_path`'s.

Lightning restores the weights, optimiser, LR schedule and loop counters, but not the global RNGs (it only
copies them into `ddp_spawn` children). Our data draw from those: the training sampler seeds itself from the
global torch RNG at each epoch's iterator, so do the loader's worker seeds, the in-memory batch augmentation
(torch, on the device), timm's Mixup (numpy) and random erasing (python `random`). Restored at load time they
give a resumed run the very draws of the uninterrupted one: nothing draws between the restore and the first
resumed iterator (Lightning's sanity check runs under `isolate_rng`).
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vit.checkpoint_files import atomic_write

CHECKPOINT_KEY = "rng_states"


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's global RNG states as plain tensors, lists and numbers (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    cuda = device is not None and device.type == "cuda"
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if cuda else None,  # the rank's own device, not every GPU
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": list(state), "gauss": gauss},
    }


def set_rng_state(saved: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(saved["torch"])
    if saved.get("cuda") is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(saved["cuda"], device)
    n = saved["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = saved["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


class RNGStateCheckpoint(Callback):
    """Saves the global RNG states of every rank (torch CPU, the rank's CUDA device, numpy, python `random`) in
    `checkpoint["rng_states"]` and restores them when `fit` resumes, so the run goes on with the same shuffles,
    augmentations, dropout masks and worker seeds as if it had never stopped; and gives each rank of a fresh DDP
    run generators of its own (seed + rank). `vit fit` always adds it."""

    def __init__(self) -> None:
        self._restored: dict[str, Any] | None = None  # this rank's states, from the checkpoint a fit resumes

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        mine = rng_state(trainer.strategy.root_device)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank saves together (Lightning's rule for save_checkpoint); rank 0 writes all ranks' states
            ranks: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        checkpoint[CHECKPOINT_KEY] = {"world_size": len(ranks), "ranks": ranks}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            rank_zero_warn("vit: the checkpoint has no RNG states; the resumed run draws other random numbers")
            return
        if saved["world_size"] != trainer.world_size:
            rank_zero_warn(
                f"vit: the checkpoint holds the RNG states of {saved['world_size']} processes, this run has "
                f"{trainer.world_size}; the resumed run draws other random numbers"
            )
            return
        self._restored = saved["ranks"][trainer.global_rank]
        set_rng_state(self._restored, trainer.strategy.root_device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size < 2 or trainer.ckpt_path:
            return  # one process; or a resumed run, whose ranks got their own states back from the checkpoint
        # seed_everything gave every rank the same generators, so batch augmentation, Mixup, erasing and drop path
        # drew the same numbers on every rank (for other images); seed + rank, as timm's train.py seeds
        seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed())) + trainer.global_rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        restored, self._restored = self._restored, None
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if restored is None or trainer.world_size < 2 or fetcher is None:
            return
        # Lightning made the first resumed epoch's iterator before it restored the loop (the LR schedule's
        # `estimated_stepping_batches` sets the loader up), with its DistributedSampler still at epoch 0; loader
        # workers drew the indices then, so the run would replay epoch 0's shuffle. Now the sampler is at this
        # epoch: make the iterator again, from the RNG states it was first made from (its worker seeds).
        set_rng_state(restored, trainer.strategy.root_device)
        iter(fetcher)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a lost mount); the file it was to replace is untouched."""


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind an exception, if any: torch's zip writer reports a full disk as a RuntimeError."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, but a local checkpoint is written to a temporary file in its own folder, synced,
    and renamed over the old one: a kill at any moment leaves the previous file or the new one, never a part.
    (Lightning writes into `tempfile.mkstemp()` and `shutil.move`s it: a copy, not a rename, whenever the
    system temp folder is on another file system than the run, as /tmp often is on clusters.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # "x": never someone else's file; the umask sets the mode, as for open()
            with atomic_write(path) as temp, open(temp, "xb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:
            cause = _os_error(e)
            if cause is None:
                raise
            before = f"the previous {path.name} is untouched" if path.is_file() else f"no {path.name} was written"
            raise CheckpointWriteError(
                f"{path}: could not write the checkpoint of epoch {checkpoint.get('epoch', '?')} "
                f"({cause.strerror or cause}); training stopped, and {before}"
            ) from e
        _fsync_folder(path.parent)  # the rename itself survives a power cut


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform or file system can open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, except that a later epoch that ties the best score replaces it.

    On a small validation split, accuracy moves in coarse steps and plateaus early; Lightning keeps the first
    epoch that reached the plateau, while the later ones, trained longer on a decaying learning rate, generalise
    at least as well. `vit fit` writes best.ckpt through this class.
    """

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        if super().check_monitor_top_k(trainer, current):
            return True
        if current is None or self.save_top_k != 1 or not self.best_k_models:
            return False
        tie = bool(torch.eq(current, self.best_k_models[self.kth_best_model_path]))
        return trainer.strategy.reduce_boolean_decision(tie)


class LastCheckpoint(ModelCheckpoint):
    """last.ckpt, rewritten at the end of every epoch unless that would spend more than `max_share` of the run on
    writing it: after a write that took t seconds, the next waits until t / max_share seconds have passed (or
    `max_wait_s`). Only epochs shorter than that are skipped, e.g. the digits set's half-second epochs, whose 16-ms
    writes would cost 3% of the run; a crash then loses at most `t / max_share` seconds of work (3 s for digits).
    The run's last epoch, any stop, and the end of training are always written.

    `dirpath` and `enable_version_counter` follow best.ckpt's callback (`--checkpoint.*`), as Lightning's own
    `save_last` does: last.ckpt lands beside best.ckpt, and a second run into a folder that already holds one writes
    last-v1.ckpt rather than replacing the first run's (a resumed run goes on writing the file it resumed from).
    """

    def __init__(
        self,
        max_share: float = 0.005,
        max_wait_s: float = 600.0,
        dirpath: str | None = None,
        enable_version_counter: bool = False,
    ):
        super().__init__(dirpath=dirpath, filename="last", monitor=None, enable_version_counter=enable_version_counter)
        self.max_share, self.max_wait_s = max_share, max_wait_s
        self._write_s: float | None = None  # how long the latest write took
        self._written_at = 0.0
        self.written_epoch: int | None = None

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if self._write_s is None or self._due(trainer):
            self._write(trainer, monitor_candidates)
        else:
            self._link_fresher(trainer, monitor_candidates)

    def _link_fresher(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        """When another callback wrote a checkpoint at this very step (best.ckpt after an improving epoch), make
        last.ckpt a hard link to it: the same state, at no cost, so last.ckpt is never older than best.ckpt (a kill
        or Ctrl-C would otherwise send the user back past an epoch that is on disk). Only with `AtomicCheckpointIO`,
        which replaces files by renaming and so never writes into the shared inode; a file system without hard
        links gets a real write."""
        saved = [
            cb
            for cb in trainer.checkpoint_callbacks
            if cb is not self and cb._last_global_step_saved == trainer.global_step and cb._last_checkpoint_saved
        ]
        # a weights-only best.ckpt (--checkpoint.save_weights_only) cannot be the last.ckpt a killed run resumes from
        fresher = [cb._last_checkpoint_saved for cb in saved if self.save_weights_only or not cb.save_weights_only]
        if saved and not fresher:
            return self._write(trainer, monitor_candidates)
        if not fresher or not isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):
            return  # last.ckpt waits for its next due write
        path = Path(self._get_metric_interpolated_filepath_name(monitor_candidates, trainer, self.best_model_path))
        linked = True
        if trainer.is_global_zero:
            try:
                with atomic_write(path) as temp:
                    os.link(fresher[-1], temp)
                _fsync_folder(path.parent)
            except OSError:  # another file system, or none with hard links
                linked = False
        if not trainer.strategy.broadcast(linked, src=0):
            return self._write(trainer, monitor_candidates)
        self.best_model_path, self.written_epoch = str(path), trainer.current_epoch
        self._last_global_step_saved, self._last_checkpoint_saved = trainer.global_step, str(path)

    def _write(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        started = time.monotonic()
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        self._written_at = time.monotonic()
        self._write_s, self.written_epoch = self._written_at - started, trainer.current_epoch

    def _due(self, trainer: L.Trainer) -> bool:
        waited = time.monotonic() - self._written_at
        due = _last_epoch(trainer) or waited >= min(self._write_s / self.max_share, self.max_wait_s)
        return bool(trainer.strategy.broadcast(due, src=0))  # rank 0's clock decides: writing is collective

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        # no checkpoint hook ran after the last epoch (validation every 2nd epoch, say, saves after validations)
        if not self._should_skip_saving_checkpoint(trainer):
            self._write(trainer, self._monitor_candidates(trainer))


def _last_epoch(trainer: L.Trainer) -> bool:
    """Whether the epoch that is ending is the run's last, as far as its end can tell."""
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    return (
        trainer.should_stop
        or (max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs)
        or (max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps)
    )


class SayHowToResume(Callback):
    """When Ctrl-C or SIGTERM (`kill`, `docker stop`, a scheduler) stops `vit fit`, say which checkpoint to go on
    from, and which epoch it holds; and that the run folder is gone when `dropped` (a `DropTheRunFolderOfAFailedStart`
    that comes before this callback) removed it."""

    def __init__(self, last: LastCheckpoint, dropped: Any = None):
        self.last, self.dropped = last, dropped

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or not trainer.is_global_zero:
            return
        path, epoch = self.last.best_model_path, self.last.written_epoch
        held = "the last epoch written" if epoch is None else f"epoch {epoch}"  # None: restored, not written here
        removed = getattr(self.dropped, "removed", None)
        # the folder's number is free again, and `--ckpt_path last` does not meet it
        gone = f"; its run folder {removed} held only its config and was removed" if removed else ""
        if path:
            print(
                f"vit fit: stopped; {path} holds {held}: add --ckpt_path {path} to resume{gone}",
                file=sys.stderr,
            )
        else:
            print(
                f"vit fit: stopped before the first epoch ended; there is no checkpoint to resume from{gone}",
                file=sys.stderr,
            )
