"""What `vit fit | validate | test --ckpt_path` finds and means: Lightning's shortcuts `last` and `best` resolved
where this config writes checkpoints, files that cannot be resumed, the model settings a checkpoint replaces
(LightningCLI 2.6 swaps every `--model.*` for the checkpoint's), and a run with nothing left to train."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Timer

# What --ckpt_path's checkpoint does not decide: its weights replace any starting weights, as a resume is expected
# to, and compiling is a choice of the machine that runs the command, not part of the run
NOT_THE_CHECKPOINTS = ("pretrained", "compile")
ARCHITECTURE = ("model_name", "model_overrides", "model_config", "img_size", "num_classes")


def replaced_model_settings(asked: dict[str, Any], restored: dict[str, Any], fitting: bool) -> list[str]:
    """The model settings of the config and command line (`asked`) that LightningCLI replaced with those of
    --ckpt_path's checkpoint (`restored`), each as 'key value (the checkpoint's: value)': the architecture's fields
    always, and the training settings (lr, warmup_epochs, mixup_alpha ...) when fitting."""
    from vit.factory import model_config
    from vit.model import ViTConfig

    changes = []
    saved = ViTConfig.from_dict(restored["model_config"]).to_dict() if restored.get("model_config") else None
    if saved is not None:
        wanted: dict[str, Any] = {}
        if asked.get("model_config"):
            wanted = dict(asked["model_config"])
        elif asked.get("model_name"):
            wanted = model_config(asked["model_name"]).to_dict()
            wanted.pop("num_classes")  # a name's default head (timm's 1000); None follows the data
        wanted |= dict(asked.get("model_overrides") or {})
        wanted |= {k: asked[k] for k in ("img_size", "num_classes") if asked.get(k) is not None}
        merged = ViTConfig.from_dict({**saved, **wanted}).to_dict()
        changes += [f"{k} {merged[k]} (the checkpoint's: {saved[k]})" for k in saved if merged[k] != saved[k]]
    if fitting:
        if "optimizer" in restored:  # None asks for the optimiser's own betas: AdamW's are (0.9, 0.999)
            from vit.optim import effective_betas

            asked = {**asked, "betas": effective_betas(restored["optimizer"], asked.get("betas"))}
            restored = {**restored, "betas": effective_betas(restored["optimizer"], restored.get("betas"))}
        for key, value in asked.items():
            if key in ARCHITECTURE or key in NOT_THE_CHECKPOINTS or key not in restored:
                continue
            if _plain(value) != _plain(restored[key]):
                changes.append(f"{key} {_plain(value)} (the checkpoint's: {_plain(restored[key])})")
    return changes


def settings_it_predates(saved: dict[str, Any]) -> dict[str, Any]:
    """The `ViTClassifier` arguments that a checkpoint's hyperparameters lack, at their defaults: it was written
    before they existed, and trained as their defaults do (AdamW, before `optimizer`). LightningCLI would keep the
    command's values for them, and resume, say, SGD from AdamW's state."""
    from vit.module import ViTClassifier

    arguments = inspect.signature(ViTClassifier.__init__).parameters.values()
    return {
        a.name: a.default
        for a in arguments
        if a.default is not inspect.Parameter.empty and a.name not in saved and a.name not in NOT_THE_CHECKPOINTS
    }


def _plain(value: Any) -> Any:
    """Tuples as lists, so that (0.9, 0.999) from a YAML file equals [0.9, 0.999] from a checkpoint."""
    return list(value) if isinstance(value, tuple) else value


def latest_run_checkpoint(logger: Any, which: str, dirpath: str | None = None, root_dir: str | None = None) -> Path:
    """`--ckpt_path last|best` from a new process: where this config writes `<which>.ckpt`. With a logger (a
    `{class_path, init_args}` mapping, or True for Lightning's default one under `root_dir`), the file in
    `<save_dir>/<name>/version_N/checkpoints/` of the highest N that has one; with `dirpath` (--checkpoint.dirpath),
    or no logger (`<root_dir>/checkpoints/`, Lightning's folder then), the newest `<which>.ckpt` or
    `<which>-vK.ckpt` there (Lightning's names for the runs that shared the folder).
    Lightning looks only in this run's own, new folder, and then trains or evaluates an untrained model."""
    if dirpath is not None or not logger:
        folder = Path(dirpath).expanduser() if dirpath is not None else Path(root_dir or ".") / "checkpoints"
        found = [p for p in folder.glob(f"{which}*.ckpt") if re.fullmatch(rf"{re.escape(which)}(-v\d+)?\.ckpt", p.name)]
        if found:
            return max(found, key=lambda p: (p.stat().st_mtime_ns, _version(p)))
        why = "--checkpoint.dirpath" if dirpath is not None else "--trainer.logger false"
        raise FileNotFoundError(
            f"--ckpt_path {which}: no {folder}/{which}.ckpt or {which}-v*.ckpt (where checkpoints go with {why}); "
            f"give the checkpoint's path"
        )
    init = (logger.get("init_args") if hasattr(logger, "get") else None) or {}
    save_dir = init.get("save_dir") or (root_dir if logger is True else None) or "."
    root = Path(save_dir) / str(init.get("name") or "lightning_logs")
    runs = [(int(n), p) for p in root.glob("version_*") if (n := p.name.removeprefix("version_")).isdigit()]
    for _, run in sorted(runs, reverse=True):
        if (path := run / "checkpoints" / f"{which}.ckpt").is_file():
            return path
    raise FileNotFoundError(
        f"--ckpt_path {which}: no {root}/version_*/checkpoints/{which}.ckpt (the runs of this config's logger); "
        f"give the checkpoint's path"
    )


def _version(path: Path) -> int:
    """K of Lightning's `name-vK.ckpt`; 0 for `name.ckpt`."""
    _, _, k = path.stem.rpartition("-v")
    return int(k) if k.isdigit() else 0


def not_resumable(path: str, checkpoint: Any, fitting: bool) -> str | None:
    """Why `--ckpt_path`'s (loaded) checkpoint cannot be what Lightning resumes or evaluates, or None: a file of
    other weights (a safetensors export, a timm state dict) lacks Lightning's keys, and one written with
    `--checkpoint.save_weights_only true` lacks the optimiser and loops that `fit` restores."""
    if not isinstance(checkpoint, dict) or not {"pytorch-lightning_version", "state_dict"} <= checkpoint.keys():
        return (
            f"{path}: not a checkpoint of a Lightning run (vit fit writes them as runs/<name>/version_N/checkpoints/"
            f"*.ckpt); to start from its weights, use --model.pretrained {path}"
        )
    if fitting and not checkpoint.get("optimizer_states"):
        return (
            f"{path} holds the weights only (--checkpoint.save_weights_only), not the optimiser and loop states that "
            f"a resumed run goes on from; start a new run from its weights with --model.pretrained {path}"
        )
    return None


def nothing_left_to_train(ckpt: str, trainer: L.Trainer) -> str:
    """The warning for `vit fit --ckpt_path` of a run that already reached this command's end: which limit, and
    how to go on."""
    if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch:
        limit = f"--trainer.max_epochs {trainer.max_epochs}"
    elif 0 <= trainer.max_steps <= trainer.global_step:
        limit = f"--trainer.max_steps {trainer.max_steps}"
    elif (timer := next((c for c in trainer.callbacks if isinstance(c, Timer)), None)) and timer.time_remaining() <= 0:
        # Lightning's Timer goes on from the training time the checkpoint holds: the same max_time stops at once
        limit = f"--trainer.max_time ({timer._duration:g} s of training, counting the runs it resumes)"
    else:
        limit = "the end of this run"
    # current_epoch is still 0 when max_time stops the start, before Lightning counts the restored epoch done
    done = max(trainer.current_epoch, trainer.fit_loop.epoch_progress.current.processed)
    epochs = f"{done} epoch{'s' * (done != 1)}"
    # max_time stops a schedule planned for max_epochs wherever it is, not at its floor
    floor = "" if limit.startswith("--trainer.max_time") else " (the restored LR schedule stays at its floor)"
    return (
        f"vit: {ckpt} has already reached {limit} ({epochs}, {trainer.global_step} steps): "
        f"nothing was trained; to train longer, raise it{floor} or start a "
        f"new run from its weights (--model.pretrained {ckpt})"
    )
