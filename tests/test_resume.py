"""Exact resume: a `vit fit` run killed with SIGKILL mid-epoch and resumed from its last.ckpt ends with the weights
of the run that was never interrupted; and a checkpoint write that is killed leaves the previous file whole."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _cli import TINY_DIGITS

from vit.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *TINY_DIGITS,
    "--trainer.limit_train_batches",
    "4",
    "--trainer.limit_val_batches",
    "1",
]
# every global generator in play: torch (sampler seed, loader seed, batch crops), numpy (Mixup's lambda),
# python `random` (random erasing), and the EMA weights besides the model's
RANDOM_EVERYWHERE = ["--model.ema_decay", "0.9", "--model.mixup_alpha", "0.4", "--data.init_args.re_prob", "0.5"]


def _env() -> dict[str, str]:
    paths = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def _fit_in_process(folder: Path, *extra: str, data: list[str] = TINY, name: str = "digits") -> dict[str, torch.Tensor]:
    """Train in `folder` (run folder version_0) and return the final state dict of last.ckpt."""
    folder.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert main(["fit", *data, *extra]) == 0
    finally:
        os.chdir(cwd)
    return torch.load(folder / f"runs/{name}/version_0/checkpoints/last.ckpt", weights_only=True)["state_dict"]


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_a_run_killed_mid_epoch_resumes_to_the_weights_of_the_uninterrupted_run(tmp_path):
    run, marker, log = tmp_path / "killed", tmp_path / "paused", tmp_path / "killed.log"
    run.mkdir()
    pause = {"class_path": "_faults.PauseMidEpoch", "init_args": {"marker": str(marker), "epoch": 1, "batch": 2}}
    command = [sys.executable, "-m", "vit.cli", "fit", *TINY, *RANDOM_EVERYWHERE, "--trainer.max_epochs", "3"]
    with open(log, "wb") as out:
        proc = subprocess.Popen([*command, f"--trainer.callbacks+={json.dumps(pause)}"], cwd=run, env=_env(),
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)  # the third batch of epoch 1 is under way: a kill mid-epoch
        proc.wait()
    assert marker.exists(), log.read_text()[-3000:]
    assert proc.returncode == -signal.SIGKILL
    last = run / "runs/digits/version_0/checkpoints/last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (0, 4) and int(marker.read_text()) == 6  # 2 steps were lost

    resumed = subprocess.run([*command, "--ckpt_path", str(last)], cwd=run, env=_env(), capture_output=True,
                             text=True, timeout=180)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = torch.load(run / "runs/digits/version_1/checkpoints/last.ckpt", weights_only=True)
    assert (final["epoch"], final["global_step"]) == (2, 12)

    uninterrupted = _fit_in_process(tmp_path / "whole", *RANDOM_EVERYWHERE, "--trainer.max_epochs", "3")
    assert any(k.startswith("ema.module.") for k in uninterrupted)
    assert _max_difference(final["state_dict"], uninterrupted) <= 1e-6
    other_seed = _fit_in_process(tmp_path / "seed1", *RANDOM_EVERYWHERE, "--trainer.max_epochs", "3",
                                 "--seed_everything", "1")  # fmt: skip
    assert _max_difference(uninterrupted, other_seed) > 1e-3  # the comparison above can fail


def test_the_saved_rng_states_are_what_makes_the_resume_exact(tmp_path):
    uninterrupted = _fit_in_process(tmp_path / "whole", "--trainer.max_epochs", "2")
    _fit_in_process(tmp_path / "part", "--trainer.max_epochs", "1")
    last = tmp_path / "part/runs/digits/version_0/checkpoints/last.ckpt"
    checkpoint = torch.load(last, weights_only=True)  # plain tensors, lists and numbers only
    states = checkpoint["rng_states"]
    assert states["world_size"] == 1 and len(states["ranks"]) == 1
    assert isinstance(states["ranks"][0]["python"]["state"], list)
    assert isinstance(states["ranks"][0]["numpy"]["keys"], torch.Tensor)
    del checkpoint["rng_states"]
    torch.save(checkpoint, tmp_path / "without_rng.ckpt")

    def resume(source: Path, folder: str) -> dict[str, torch.Tensor]:
        return _fit_in_process(tmp_path / folder, "--trainer.max_epochs", "2", "--ckpt_path", str(source))

    assert _max_difference(resume(last, "with"), uninterrupted) <= 1e-6
    assert _max_difference(resume(tmp_path / "without_rng.ckpt", "without"), uninterrupted) > 1e-4


@pytest.mark.parametrize("in_memory", ["false", "true"])
def test_resume_is_exact_when_loader_workers_augment(tmp_path, in_memory):
    """RandAugment drawn in a worker process, whose seed comes from the global torch RNG: with flips and erasing
    there too (from files), or on the cached pixels before the batch crop, flip and erasing (in memory)."""
    from _images import write_image_folder

    train = write_image_folder(tmp_path / "train", per_class=8)
    folder = ["--config", str(ROOT / "configs" / "imagefolder.yaml"), "--data.train_dir", str(train)]
    tiny = json.dumps({"embed_dim": 16, "depth": 1, "num_heads": 2})
    small = ["--model.img_size", "16", "--model.model_overrides", tiny, "--data.batch_size", "8"]
    data = [*folder, *small, "--data.num_workers", "1", "--data.in_memory", in_memory]
    data += ["--trainer.enable_progress_bar", "false"]

    def fit(where: str, epochs: int, *extra: str) -> dict[str, torch.Tensor]:
        return _fit_in_process(tmp_path / where, "--trainer.max_epochs", str(epochs), *extra, data=data,
                               name="imagefolder")  # fmt: skip

    uninterrupted = fit("whole", 3)
    fit("part", 1)
    resumed = fit("resumed", 3, "--ckpt_path", str(tmp_path / "part/runs/imagefolder/version_0/checkpoints/last.ckpt"))
    assert _max_difference(resumed, uninterrupted) <= 1e-6
    assert _max_difference(fit("seed1", 3, "--seed_everything", "1"), uninterrupted) > 1e-4


WRITER = """
import resource, signal, sys, torch
from vit.resume import AtomicCheckpointIO
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # python ignores it (writes then fail with EFBIG); the default kills
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
AtomicCheckpointIO().save_checkpoint({"w": torch.ones(1_000_000)}, sys.argv[1])
"""


def test_a_checkpoint_write_killed_halfway_leaves_the_previous_file_whole(tmp_path):
    from vit.resume import AtomicCheckpointIO

    path = tmp_path / "run" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(10)}, path)
    before = path.read_bytes()
    # the kernel kills the writer (SIGXFSZ) when a file it writes grows past 1 MB: midway through 4 MB
    proc = subprocess.run([sys.executable, "-c", WRITER, str(path), str(2**20)], env=_env(), capture_output=True)
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr.decode()[-2000:]
    assert path.read_bytes() == before
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(10))
    leftovers = [p for p in path.parent.iterdir() if p != path]
    assert len(leftovers) == 1 and 0 < leftovers[0].stat().st_size <= 2**20  # the killed write went to a side file

    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, path)  # the next good write clears it away
    assert sorted(path.parent.iterdir()) == [path]
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))


def test_a_good_write_removes_only_the_temporaries_that_killed_writes_of_its_file_left(tmp_path):
    from vit.checkpoint_files import atomic_write_beside
    from vit.resume import AtomicCheckpointIO

    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a writer still at work
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = int(ended.stdout)  # the id of a process that has ended, as a SIGKILLed writer's
    try:
        names = {
            "stale": [f".last.ckpt.{gone}-0123abcd.tmp", f".epoch[1].ckpt.{gone}-89abcdef.tmp"],
            "kept": [
                f".last.ckpt.{running.pid}-0123abcd.tmp",  # the live write of another process
                ".last.ckpt.backup.tmp",  # someone else's name, not atomic_write's pattern
                f".best.ckpt.{gone}-0123abcd.tmp",  # a temporary of another file
                f"last.ckpt.{gone}-0123abcd.tmp",
            ],
        }
        for name in names["stale"] + names["kept"]:
            (tmp_path / name).write_bytes(b"part")
        AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, tmp_path / "last.ckpt")
        AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, tmp_path / "epoch[1].ckpt")  # a glob's brackets
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names["kept"], "epoch[1].ckpt", "last.ckpt"])

        # `vit export`'s ONNX writer works in a temporary folder: a killed one is removed by the next export
        (tmp_path / f".model.onnx.{gone}-0123abcd.tmp").mkdir()
        (tmp_path / f".model.onnx.{gone}-0123abcd.tmp" / "model.onnx").write_bytes(b"part")
        with atomic_write_beside(tmp_path / "model.onnx") as temp:
            temp.write_bytes(b"whole")
        assert (tmp_path / "model.onnx").read_bytes() == b"whole"
        assert not list(tmp_path.glob(".model.onnx.*"))
    finally:
        running.kill()
        running.wait()


def _interrupted(argv: list[str]) -> int:
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores further Ctrl-C once it caught one
    try:
        return main(argv)
    finally:
        signal.signal(signal.SIGINT, sigint)


def _ctrl_c_at(epoch: int, batch: int) -> str:
    stop = {"class_path": "_faults.InterruptMidEpoch", "init_args": {"epoch": epoch, "batch": batch}}
    return f"--trainer.callbacks+={json.dumps(stop)}"


def test_ctrl_c_before_the_first_checkpoint_removes_the_run_folder_and_last_resumes_the_run_before(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", *TINY, "--trainer.max_epochs", "1"]) == 0  # version_0: 4 steps, last.ckpt
    capsys.readouterr()
    # 2 steps trained, none logged (digits.yaml logs every 10th), no checkpoint: the folder holds its config alone
    assert _interrupted(["fit", *TINY, "--trainer.max_epochs", "2", _ctrl_c_at(epoch=0, batch=2)]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        "vit fit: stopped before the first epoch ended; there is no checkpoint to resume from; its run folder "
        f"{Path('runs/digits/version_1')} held only its config and was removed"
    )
    assert [p.name for p in Path("runs/digits").iterdir()] == ["version_0"]
    assert main(["fit", *TINY, "--trainer.max_epochs", "2", "--ckpt_path", "last"]) == 0
    resumed = torch.load("runs/digits/version_1/checkpoints/last.ckpt", weights_only=True)  # the number is free
    assert resumed["global_step"] == 8  # version_0's 4 steps, and 4 more


def test_a_run_stopped_before_its_first_checkpoint_keeps_a_folder_that_holds_its_logs(
    tmp_path, monkeypatch, capsys, caplog
):
    from vit.module import ViTClassifier

    monkeypatch.chdir(tmp_path)
    assert main(["fit", *TINY, "--trainer.max_epochs", "1"]) == 0
    capsys.readouterr()
    step = ViTClassifier.training_step

    def logging_step(self, batch, batch_idx):  # rows logged straight to the logger wait in memory to be saved
        self.logger.log_metrics({"custom/norm": 1.0}, step=self.global_step)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(ViTClassifier, "training_step", logging_step)
    assert _interrupted(["fit", *TINY, "--trainer.max_epochs", "2", _ctrl_c_at(epoch=0, batch=2)]) == 130
    assert "was removed" not in capsys.readouterr().err
    run = Path("runs/digits/version_1")
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "hparams.yaml", "metrics.csv"]
    with open(run / "metrics.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [0, 1]
    caplog.clear()
    assert main(["test", *TINY, "--ckpt_path", "best"]) == 0  # the latest run that has one
    assert f"checkpoint path at {Path('runs/digits/version_0/checkpoints/best.ckpt')}" in caplog.text


def test_checkpoints_are_renamed_into_place_from_their_own_folder(tmp_path, monkeypatch):
    """A rename within one file system is atomic; Lightning's own IO moves a file from the system temp folder,
    which is a copy whenever that is another file system."""
    from vit.resume import AtomicCheckpointIO

    renames = []
    real_replace = os.replace
    monkeypatch.setattr(
        os, "replace", lambda src, dst: (renames.append((Path(src), Path(dst))), real_replace(src, dst))
    )
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))
    path = tmp_path / "run" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, path)
    assert len(renames) == 1 and renames[0][1] == path and renames[0][0].parent == path.parent


def test_vit_fit_writes_its_checkpoints_through_the_atomic_io(tmp_path, monkeypatch):
    from vit.resume import AtomicCheckpointIO

    written = []
    real_save = AtomicCheckpointIO.save_checkpoint

    def save(self, checkpoint, path, **kwargs):
        written.append(Path(path).name)
        return real_save(self, checkpoint, path, **kwargs)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save)
    _fit_in_process(tmp_path, "--trainer.max_epochs", "1")
    assert sorted(written) == ["best.ckpt", "last.ckpt"]


def test_rng_states_restore_every_generator_including_cached_gaussians():
    import random

    import numpy as np

    from vit.resume import rng_state, set_rng_state

    random.gauss(0, 1), np.random.standard_normal()  # each caches a second gaussian, part of the state
    saved = rng_state(torch.device("cpu"))

    def draw() -> list:
        return [torch.rand(3).tolist(), np.random.standard_normal(3).tolist(), random.gauss(0, 1), random.random()]

    before = draw()
    set_rng_state(saved, torch.device("cpu"))
    assert draw() == before


@pytest.mark.parametrize("sent, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_says_which_checkpoint_to_resume_from(tmp_path, sent, status):
    marker = tmp_path / "paused"
    pause = {"class_path": "_faults.PauseMidEpoch", "init_args": {"marker": str(marker), "epoch": 1, "batch": 1}}
    command = [sys.executable, "-m", "vit.cli", "fit", *TINY, "--trainer.max_epochs", "3"]
    proc = subprocess.Popen([*command, f"--trainer.callbacks+={json.dumps(pause)}"], cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(sent)  # Ctrl-C (or `kill`) in epoch 1, after epoch 0's checkpoint
    err = proc.communicate(timeout=60)[1]
    last = tmp_path / "runs/digits/version_0/checkpoints/last.ckpt"
    assert proc.returncode == status, err[-3000:]  # not 2, which says the command line was wrong
    assert f"vit fit: stopped; {last.relative_to(tmp_path)} holds epoch 0: add --ckpt_path" in err
    assert torch.load(last, weights_only=True)["epoch"] == 0


def test_ctrl_c_names_the_last_ckpt_in_checkpoint_dirpath_and_last_resumes_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    mine = ["--checkpoint.dirpath", "mine", "--trainer.max_epochs", "2"]
    assert _interrupted(["fit", *TINY, *mine, _ctrl_c_at(epoch=1, batch=1)]) == 130
    last = tmp_path / "mine" / "last.ckpt"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"vit fit: stopped; {last} holds epoch 0: add --ckpt_path {last} to resume"
    )
    assert main(["fit", *TINY, *mine, "--ckpt_path", "last"]) == 0
    # the resumed run goes on writing the file it resumed from, as Lightning's own last.ckpt would
    assert f"checkpoints: best {tmp_path / 'mine' / 'best.ckpt'}  last {last}" in capsys.readouterr().out
    assert torch.load(last, weights_only=True)["global_step"] == 8


def test_ctrl_c_that_python_drops_in_a_finalizer_still_stops_the_run(tmp_path, monkeypatch, capsys):
    # a loader iterator left before its end (limit_train_batches, the sanity check) shuts its workers down in
    # __del__: a Ctrl-C there was printed as 'Exception ignored' and training went on to its end, status 0
    lost = {"class_path": "_faults.CtrlCInAFinalizer", "init_args": {"epoch": 0}}
    monkeypatch.chdir(tmp_path)
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores further Ctrl-C once it caught one
    try:
        status = main(["fit", *TINY, "--trainer.max_epochs", "3", f"--trainer.callbacks+={json.dumps(lost)}"])
    finally:
        signal.signal(signal.SIGINT, sigint)
    err = capsys.readouterr().err
    assert status == 130, err[-2000:]
    assert "vit fit: stopped; " in err
    last = torch.load(tmp_path / "runs/digits/version_0/checkpoints/last.ckpt", weights_only=True)
    assert last["epoch"] == 0 and last["global_step"] == 4  # stopped in epoch 1, not trained on to epoch 2


def _record_writes(monkeypatch) -> list[tuple[str, int, int]]:
    """(file name, epoch, global step) of every checkpoint `vit fit` writes, in order."""
    from vit.resume import AtomicCheckpointIO

    writes, write = [], AtomicCheckpointIO.save_checkpoint

    def recording(self, checkpoint, path, storage_options=None):
        writes.append((Path(path).name, checkpoint["epoch"], checkpoint["global_step"]))
        return write(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording)
    return writes


def _last_checkpoint_waits(monkeypatch, max_share: float, max_wait_s: float) -> None:
    from functools import partialmethod

    from vit.resume import LastCheckpoint

    init = partialmethod(LastCheckpoint.__init__, max_share=max_share, max_wait_s=max_wait_s)
    monkeypatch.setattr(LastCheckpoint, "__init__", init)


@pytest.mark.parametrize("share, every_epoch", [(1e-9, False), (1.0, True)])
def test_last_checkpoint_skips_epochs_shorter_than_its_writes_cost_but_never_the_last(
    tmp_path, monkeypatch, share, every_epoch
):
    # 1e-9: a write (ms) would make the next wait for days, so only the first and the last epoch are written;
    # a wait capped at 0 s writes every epoch, as Lightning's ModelCheckpoint does
    _last_checkpoint_waits(monkeypatch, max_share=share, max_wait_s=0.0 if every_epoch else 1e9)
    writes = _record_writes(monkeypatch)
    _fit_in_process(tmp_path, "--trainer.max_epochs", "5", "--checkpoint.save_top_k", "0")
    last = [(epoch, step) for name, epoch, step in writes if name == "last.ckpt"]
    assert last == ([(e, 4 * (e + 1)) for e in range(5)] if every_epoch else [(0, 4), (4, 20)])


def test_the_final_weights_reach_last_ckpt_even_when_no_checkpoint_hook_runs_after_the_last_epoch(tmp_path):
    # validating every 2nd epoch, Lightning's ModelCheckpoint writes after validations only: epochs 1, 3, ...
    every_2nd = ["--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "2", *RANDOM_EVERYWHERE]
    _fit_in_process(tmp_path / "every_2nd", *every_2nd)
    last = tmp_path / "every_2nd/runs/digits/version_0/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 12  # 3 epochs of 4 steps, not epoch 1's 8
    more = ["--trainer.max_epochs", "4", "--ckpt_path", str(last)]
    _fit_in_process(tmp_path / "more", *more, "--trainer.check_val_every_n_epoch", "2", *RANDOM_EVERYWHERE)
    resumed = torch.load(tmp_path / "more/runs/digits/version_0/checkpoints/last.ckpt", weights_only=True)
    assert (resumed["epoch"], resumed["global_step"]) == (3, 16)  # went on from step 12


def test_last_ckpt_is_never_older_than_best_ckpt(tmp_path, monkeypatch, capsys):
    # last.ckpt's own writes: epoch 0 and the end only; best.ckpt (monitoring the epoch) is written every epoch.
    # Stopped in epoch 2, last.ckpt must hold epoch 1, as best.ckpt does, not send the user back to epoch 0.
    _last_checkpoint_waits(monkeypatch, max_share=1e-9, max_wait_s=1e9)
    writes = _record_writes(monkeypatch)
    stop = {"class_path": "_faults.InterruptMidEpoch", "init_args": {"epoch": 2, "batch": 1}}
    best_every_epoch = ["--checkpoint.monitor", "epoch", "--checkpoint.mode", "max"]
    monkeypatch.chdir(tmp_path)
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores further Ctrl-C once it caught one
    try:
        status = main(
            ["fit", *TINY, *best_every_epoch, "--trainer.max_epochs", "4", f"--trainer.callbacks+={json.dumps(stop)}"]
        )
    finally:
        signal.signal(signal.SIGINT, sigint)
    folder = tmp_path / "runs/digits/version_0/checkpoints"
    last, best = (torch.load(folder / name, weights_only=True) for name in ("last.ckpt", "best.ckpt"))
    assert status == 130
    assert ("last.ckpt", 1, 8) not in writes  # no second write: a link to best.ckpt's file
    assert (last["epoch"], last["global_step"]) == (best["epoch"], best["global_step"]) == (1, 8)
    assert not (folder / "last.ckpt").is_symlink()
    assert (
        f"{Path('runs/digits/version_0/checkpoints/last.ckpt')} holds epoch 1: add --ckpt_path"
        in capsys.readouterr().err
    )


def test_last_ckpt_does_not_become_a_link_to_a_weights_only_best_ckpt(tmp_path, monkeypatch):
    # --checkpoint.save_weights_only writes best.ckpt without the optimiser and loops; last.ckpt, what a killed run
    # resumes from, must keep them at every epoch, not only after its own writes
    import vit.resume

    _last_checkpoint_waits(monkeypatch, max_share=1e-9, max_wait_s=1e9)  # its own writes: epoch 0 and the end only
    linked, link = [], os.link

    def recording_link(src, dst):
        linked.append("optimizer_states" in torch.load(src, weights_only=True))
        link(src, dst)

    monkeypatch.setattr(vit.resume.os, "link", recording_link)
    writes = _record_writes(monkeypatch)
    best_every_epoch = ["--checkpoint.monitor", "epoch", "--checkpoint.mode", "max"]
    _fit_in_process(tmp_path, *best_every_epoch, "--checkpoint.save_weights_only", "true", "--trainer.max_epochs", "3")
    assert all(linked)  # a link only ever to a checkpoint that resumes
    assert [epoch for name, epoch, _ in writes if name == "last.ckpt"] == [0, 1, 2]  # and never older than best
    best = torch.load(tmp_path / "runs/digits/version_0/checkpoints/best.ckpt", weights_only=True)
    assert "optimizer_states" not in best  # the option did apply to best.ckpt


@pytest.mark.parametrize("classes", [("ant", "bee"), ("ant", "bee", "cat", "dog")], ids=["fewer", "more"])
def test_resuming_on_data_of_another_class_count_names_both_class_lists(tmp_path, monkeypatch, capsys, classes):
    # the checkpoint's hyperparameters rebuild its own 3-class model, so `--model.num_classes` cannot be the way out
    from _images import write_image_folder

    monkeypatch.chdir(tmp_path)
    fit = ["fit", "--config", str(ROOT / "configs/imagefolder.yaml"), "--data.num_workers", "0"]
    fit += ["--data.batch_size", "4", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]
    write_image_folder(tmp_path / "three", classes=("cat", "dog", "fox"), per_class=4, size=16)
    assert main([*fit, "--data.train_dir", "three", "--trainer.max_epochs", "1"]) == 0
    last = Path("runs/imagefolder/version_0/checkpoints/last.ckpt")
    write_image_folder(tmp_path / "other", classes=classes, per_class=4, size=16)
    capsys.readouterr()
    resume = ["--data.train_dir", "other", "--trainer.max_epochs", "2", "--ckpt_path", str(last)]
    assert main([*fit, *resume, "--model.num_classes", str(len(classes))]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"vit fit: error: {last} was trained on the classes cat, dog, fox, but the data has {', '.join(classes)}: "
        "its outputs would be scored against other labels"
    )
    assert not Path("runs/imagefolder/version_1").exists()
