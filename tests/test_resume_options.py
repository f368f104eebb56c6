"""`--ckpt_path` with options other than the run's: LightningCLI (2.6) replaces every model argument with the
checkpoint's hyperparameters, so each one it drops is named; compiling follows the command, not the checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import _cli
import pytest
import torch

from vit.cli import main
from vit.model import VisionTransformer

TINY = [*_cli.TINY_DIGITS, "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1"]
LAST = "runs/digits/version_0/checkpoints/last.ckpt"


@pytest.fixture
def finished_run(tmp_path, monkeypatch, capsys) -> str:
    """A one-epoch digits run in tmp_path; its last.ckpt's path."""
    monkeypatch.chdir(tmp_path)
    assert main(["fit", *TINY, "--trainer.max_epochs", "1"]) == 0
    capsys.readouterr()
    return LAST


def replaced(err: str) -> list[str]:
    return [line for line in err.splitlines() if "brings its own model settings" in line]


def test_resuming_with_other_model_settings_names_each_one_the_checkpoint_replaces(finished_run, capsys):
    deeper = json.dumps({"in_chans": 1, "embed_dim": 16, "depth": 2, "num_heads": 2})
    options = ["--model.lr", "0.01", "--model.model_overrides", deeper, "--model.mixup_alpha", "0.8"]
    assert main(["fit", *TINY, "--trainer.max_epochs", "2", "--ckpt_path", finished_run, *options]) == 0
    lines = replaced(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"vit fit: warning: {finished_run} ")
    for change in ("depth 2 (the checkpoint's: 1)", "lr 0.01 (the checkpoint's: 0.003)", "mixup_alpha 0.8"):
        assert change in lines[0]
    assert f"--model.pretrained {finished_run}" in lines[0]
    resumed = torch.load("runs/digits/version_1/checkpoints/last.ckpt", weights_only=True)
    assert resumed["hyper_parameters"]["lr"] == 0.003 and resumed["global_step"] == 6  # as the warning says


def test_resuming_with_the_runs_own_settings_says_nothing_of_them(finished_run, capsys):
    assert main(["fit", *TINY, "--trainer.max_epochs", "2", "--ckpt_path", finished_run]) == 0
    assert not replaced(capsys.readouterr().err)


def _as_written_before_the_optimizer_setting(path: str) -> None:
    checkpoint = torch.load(path, weights_only=True)
    saved = checkpoint["hyper_parameters"]
    del saved["optimizer"], saved["momentum"]
    saved["betas"] = (0.9, 0.999)  # the old default, saved with every checkpoint
    torch.save(checkpoint, path)


@pytest.mark.parametrize("old", [False, True])
def test_resuming_with_another_optimizer_names_it_and_trains_on_with_the_checkpoints(finished_run, capsys, old):
    if old:  # LightningCLI keeps the command's value of a setting the checkpoint lacks: SGD on AdamW's state
        _as_written_before_the_optimizer_setting(finished_run)
    assert (
        main(["fit", *TINY, "--trainer.max_epochs", "2", "--ckpt_path", finished_run, "--model.optimizer", "sgd"]) == 0
    )
    lines = replaced(capsys.readouterr().err)
    assert len(lines) == 1 and "optimizer sgd (the checkpoint's: adamw)" in lines[0] and "betas" not in lines[0]
    resumed = torch.load("runs/digits/version_1/checkpoints/last.ckpt", weights_only=True)
    assert resumed["hyper_parameters"]["optimizer"] == "adamw" and resumed["global_step"] == 6
    assert all("exp_avg" in state for state in resumed["optimizer_states"][0]["state"].values())


def test_resuming_a_checkpoint_from_before_the_optimizer_setting_with_its_own_settings_says_nothing(
    finished_run, capsys
):
    _as_written_before_the_optimizer_setting(finished_run)  # betas (0.9, 0.999): AdamW's own, as None asks
    assert main(["fit", *TINY, "--trainer.max_epochs", "2", "--ckpt_path", finished_run]) == 0
    assert not replaced(capsys.readouterr().err)


@pytest.mark.parametrize("command", ["validate", "test"])
def test_evaluating_names_only_the_architecture_it_replaces(finished_run, capsys, command):
    assert main([command, *TINY, "--ckpt_path", finished_run, "--model.lr", "0.5"]) == 0
    assert not replaced(capsys.readouterr().err)  # training settings do not matter to an evaluation
    assert main([command, *TINY, "--ckpt_path", finished_run, "--model.img_size", "32"]) == 0
    lines = replaced(capsys.readouterr().err)
    assert len(lines) == 1 and "img_size 32 (the checkpoint's: 16)" in lines[0]


def test_compiling_follows_the_command_not_the_checkpoint(finished_run, monkeypatch, capsys):
    checkpoint = torch.load(finished_run, weights_only=True)
    checkpoint["hyper_parameters"]["compile"] = True  # as a GPU run with --model.compile true writes it
    torch.save(checkpoint, finished_run)
    compiled = []
    monkeypatch.setattr(VisionTransformer, "compile", lambda self, **kw: compiled.append(kw), raising=False)
    assert main(["validate", *TINY, "--ckpt_path", finished_run]) == 0  # digits.yaml: compile false
    assert compiled == [] and not replaced(capsys.readouterr().err)
    assert main(["validate", *TINY, "--ckpt_path", finished_run, "--model.compile", "true"]) == 0
    assert compiled == [{"backend": "inductor"}]


@pytest.mark.parametrize("command,which", [("validate", "last"), ("test", "best"), ("fit", "last")])
def test_ckpt_path_last_or_best_in_a_new_process_is_the_latest_runs_checkpoint(
    finished_run, capsys, caplog, command, which
):
    # Lightning looks for them in this command's own new run folder only, finds none, and goes on untrained
    assert main(["fit", *TINY, "--trainer.max_epochs", "1"]) == 0  # version_1, the latest run with checkpoints
    more = ["--trainer.max_epochs", "2"] if command == "fit" else []
    caplog.clear()
    assert main([command, *TINY, "--ckpt_path", which, *more]) == 0
    assert f"checkpoint path at runs/digits/version_1/checkpoints/{which}.ckpt" in caplog.text
    assert "no last checkpoint available" not in capsys.readouterr().err


def test_ckpt_path_last_without_a_run_is_one_line_naming_where_it_looked(finished_run, capsys):
    assert main(["validate", *TINY, "--trainer.logger.init_args.name", "other", "--ckpt_path", "last"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "vit validate: error: --ckpt_path last: no runs/other/version_*/checkpoints/last.ckpt (the runs of this "
        "config's logger); give the checkpoint's path"
    )


def _report(out: str) -> tuple[Path, Path]:
    """best.ckpt's and last.ckpt's paths in `vit fit`'s 'checkpoints: best ...  last ...' line (relative to the
    working folder as Lightning gives them with a relative --trainer.default_root_dir)."""
    line = next(line for line in out.splitlines() if line.startswith("checkpoints: "))
    best, last = line.removeprefix("checkpoints: best ").split("  last ")
    return Path(best).resolve(), Path(last).resolve()


@pytest.mark.parametrize(
    "where,folder",
    [(["--trainer.logger", "false", "--trainer.default_root_dir", "root"], "root/checkpoints"),
     (["--checkpoint.dirpath", "mine"], "mine")],
)  # fmt: skip
def test_a_second_run_into_a_shared_checkpoint_folder_keeps_the_first_and_last_or_best_finds_the_newest(
    tmp_path, monkeypatch, capsys, caplog, where, folder
):
    monkeypatch.chdir(tmp_path)
    shared = (tmp_path / folder).resolve()
    assert main(["fit", *TINY, "--trainer.max_epochs", "1", *where]) == 0
    # last.ckpt beside best.ckpt, as Lightning's own save_last writes it; not in a run folder
    assert _report(capsys.readouterr().out) == (shared / "best.ckpt", shared / "last.ckpt")
    assert not list(tmp_path.glob("runs/digits/version_0/checkpoints/*"))
    first = torch.load(shared / "last.ckpt", weights_only=True)["global_step"]
    assert main(["fit", *TINY, "--trainer.max_epochs", "2", *where]) == 0
    # Lightning's version counter names the second run's files: the first run's stay as they were
    assert _report(capsys.readouterr().out) == (shared / "best-v1.ckpt", shared / "last-v1.ckpt")
    assert torch.load(shared / "last.ckpt", weights_only=True)["global_step"] == first
    assert torch.load(shared / "last-v1.ckpt", weights_only=True)["global_step"] == 2 * first
    for which in ("last", "best"):
        caplog.clear()
        assert main(["validate", *TINY, *where, "--ckpt_path", which]) == 0
        assert f"checkpoint path at {Path(folder) / which}-v1.ckpt" in caplog.text


@pytest.mark.parametrize(
    "where,looked",
    [(["--trainer.logger", "false"], "checkpoints/last.ckpt or last-v*.ckpt (where checkpoints go with "
      "--trainer.logger false)"),
     (["--checkpoint.dirpath", "mine"], "mine/last.ckpt or last-v*.ckpt (where checkpoints go with "
      "--checkpoint.dirpath)")],
)  # fmt: skip
def test_ckpt_path_last_without_a_checkpoint_in_the_folder_this_config_writes_to_names_it(
    finished_run, capsys, where, looked
):
    # finished_run's last.ckpt is in runs/digits/version_0/: not where this command's checkpoints go
    assert main(["validate", *TINY, *where, "--ckpt_path", "last"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"vit validate: error: --ckpt_path last: no {looked}; give the checkpoint's path"
    )


def test_resuming_a_run_that_already_reached_max_epochs_says_so_and_leaves_no_empty_folder(finished_run, capsys):
    assert main(["fit", *TINY, "--trainer.max_epochs", "1", "--ckpt_path", finished_run]) == 0  # as Lightning: 0
    out, err = capsys.readouterr()
    notes = [line for line in err.splitlines() if "nothing was trained" in line]
    assert len(notes) == 1 and notes[0].startswith(f"vit fit: warning: {finished_run} has already reached ")
    assert "--trainer.max_epochs 1 (1 epoch, 3 steps)" in notes[0] and f"--model.pretrained {finished_run}" in notes[0]
    assert not Path("runs/digits/version_1").exists()  # only its config.yaml and hparams.yaml: removed
    assert "run folder:" not in out and "final metrics" not in out  # no empty report
    assert f"last {finished_run}" in out  # the checkpoints it holds are still the run's own


def test_resuming_a_run_that_used_up_max_time_names_max_time_not_the_schedules_floor(finished_run, capsys):
    # Lightning's Timer goes on from the training time a checkpoint holds: as if the first run had trained 100 s
    checkpoint = torch.load(finished_run, weights_only=True)
    checkpoint["callbacks"]["Timer"] = {"time_elapsed": {"train": 100.0, "sanity_check": 0.0, "validate": 1.0}}
    torch.save(checkpoint, finished_run)
    time_bound = ["--trainer.max_epochs", "5", "--trainer.max_time", "00:00:00:30"]
    assert main(["fit", *TINY, *time_bound, "--ckpt_path", finished_run]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "nothing was trained" in line]
    assert len(notes) == 1
    assert "reached --trainer.max_time (30 s of training, counting the runs it resumes) (1 epoch, 3 steps)" in notes[0]
    assert "floor" not in notes[0]  # a schedule planned for 5 epochs and cut off after 1 is not at its floor


def test_with_the_logger_off_nothing_left_to_train_never_removes_the_working_folder(finished_run, tmp_path, capsys):
    # with no logger, the "run folder" is the working folder, which then holds only the config this run wrote
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)  # the fixture's monkeypatch.chdir restores the folder afterwards
    resume = ["--trainer.logger", "false", "--ckpt_path", str(tmp_path / finished_run)]
    assert main(["fit", *TINY, "--trainer.max_epochs", "1", *resume]) == 0
    assert "nothing was trained" in capsys.readouterr().err
    assert elsewhere.is_dir() and (elsewhere / "config.yaml").is_file()


def test_a_resumed_run_that_fails_before_its_first_new_step_leaves_no_run_folder(finished_run, monkeypatch, capsys):
    from vit.module import ViTClassifier

    def fails(self, batch, batch_idx):
        raise ValueError("a fault in the first step")

    monkeypatch.setattr(ViTClassifier, "training_step", fails)
    assert main(["fit", *TINY, "--trainer.max_epochs", "2", "--ckpt_path", finished_run]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "vit fit: error: a fault in the first step"
    assert not Path("runs/digits/version_1").exists()  # the resumed step is the checkpoint's, not one of its own


def _safetensors_export(last: str) -> str:
    assert main(["export", "-c", last, "--out", "model.safetensors"]) == 0
    return "model.safetensors"


def _weights_only_copy(last: str) -> str:  # what --checkpoint.save_weights_only true writes as best.ckpt
    checkpoint = torch.load(last, weights_only=True)
    del checkpoint["optimizer_states"], checkpoint["lr_schedulers"]
    torch.save(checkpoint, "weights_only.ckpt")
    return "weights_only.ckpt"


def _timm_state_dict(last: str) -> str:
    state = torch.load(last, weights_only=True)["state_dict"]
    torch.save({k.removeprefix("model."): v for k, v in state.items()}, "timm.pth")
    return "timm.pth"


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_safetensors_export, "not a checkpoint of a Lightning run"),
        (_timm_state_dict, "not a checkpoint of a Lightning run"),
        (_weights_only_copy, "holds the weights only (--checkpoint.save_weights_only)"),
    ],
    ids=["safetensors-export", "timm-state-dict", "weights-only"],
)
def test_resuming_from_a_file_of_weights_without_the_training_state_is_one_line(finished_run, make, says, capsys):
    path = make(finished_run)
    capsys.readouterr()
    assert main(["fit", *TINY, "--trainer.max_epochs", "2", "--ckpt_path", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vit fit: error: {path}") and says in err and len(err.splitlines()) == 1
    assert f"--model.pretrained {path}" in err  # what to do instead
    assert sorted(p.name for p in Path("runs/digits").iterdir()) == ["version_0"]
