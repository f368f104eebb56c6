"""`vit fit` with DDP on two CPU processes (gloo): one run folder, one set of checkpoints, one report, metrics
reduced over both processes; and a failure in either process ends the whole command instead of hanging it."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cli import TINY_DIGITS

from vit.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *TINY_DIGITS,
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "3",
]
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
LIMIT_S = 150  # a hang would last the process-group timeout (30 minutes)


def _vit_fit(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python -m vit.cli fit` in its own session, returning as soon as the launching process ends (its output goes
    to files, which the ranks it started cannot hold open); on a hang the process group is killed and the test fails."""
    paths = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    command = [sys.executable, "-m", "vit.cli", "fit", *TINY, *DDP, *extra]
    out, err = cwd / "stdout.txt", cwd / "stderr.txt"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=o, stderr=e, start_new_session=True)
        try:
            proc.wait(timeout=LIMIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"vit fit with 2 processes still ran after {LIMIT_S} s")
    return subprocess.CompletedProcess(command, proc.returncode, out.read_text(), err.read_text())


def _val_metrics(run: Path) -> dict[str, float]:
    with open(run / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("val/acc")]
    return {k: float(rows[-1][k]) for k in ("val/acc", "val/loss")}


def test_ddp_on_two_processes_writes_one_run_with_metrics_over_the_whole_validation_split(tmp_path, monkeypatch):
    draws = ["--trainer.callbacks+=_faults.RecordRandomDraws", "--trainer.callbacks.folder", str(tmp_path)]
    done = _vit_fit(tmp_path, "--model.ema_decay", "0.9", *draws)  # EMA weights: parameters that get no gradient
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for generator in ("torch", "numpy", "random"):  # each rank augments with generators of its own
        assert ranks[0][generator] != ranks[1][generator], generator
    assert "distributed_backend=gloo" in done.stderr and "Starting with 2 processes" in done.stderr
    assert done.stdout.count("run folder: ") == 1 and done.stdout.count("final metrics: ") == 1
    run = tmp_path / "runs/digits/version_0"
    assert [p.name for p in (tmp_path / "runs/digits").iterdir()] == ["version_0"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]

    # oracle: the same weights validated by one process over the whole split (144 images: 72 per rank, no padding)
    monkeypatch.chdir(tmp_path)
    last = run / "checkpoints/last.ckpt"
    assert main(["validate", *TINY[:2], "--trainer.enable_progress_bar", "false", "--ckpt_path", str(last)]) == 0
    single, distributed = _val_metrics(tmp_path / "runs/digits/version_1"), _val_metrics(run)
    assert single["val/acc"] == distributed["val/acc"]
    assert abs(single["val/loss"] - distributed["val/loss"]) < 1e-5


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its exit status waits to be collected


@pytest.mark.parametrize("rank", [1, 0], ids=["rank1-raises", "rank0-raises"])
def test_an_exception_in_one_rank_ends_every_process_with_an_error(tmp_path, rank):
    fault = {"class_path": "_faults.RaiseOnRank", "init_args": {"rank": rank, "step": 1, "pid_dir": str(tmp_path)}}
    done = _vit_fit(tmp_path, f"--trainer.callbacks+={json.dumps(fault)}")
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids)  # checked the moment the command returned
    assert done.returncode != 0
    assert f"injected fault on rank {rank} at step 1" in done.stderr


def test_a_resumed_ddp_run_with_loader_workers_trains_the_weights_of_the_uninterrupted_one(tmp_path):
    # With loader workers the first resumed epoch's DistributedSampler indices are drawn when Lightning first sets
    # the loader up, before it restores the epoch: without RNGStateCheckpoint's fix it replays epoch 0's shuffle.
    every_epoch = ["--checkpoint.save_top_k", "-1", "--checkpoint.filename", "epoch{epoch}"]
    two_epochs = ["--trainer.max_epochs", "2", "--data.num_workers", "1", *every_epoch]
    whole, first = tmp_path / "whole", tmp_path / "resumed"
    for folder in (whole, first):
        folder.mkdir()
    assert _vit_fit(whole, *two_epochs).returncode == 0
    epoch0 = whole / "runs/digits/version_0/checkpoints/epoch0.ckpt"
    done = _vit_fit(first, *two_epochs, "--ckpt_path", str(epoch0))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (
        torch.load(folder / f"runs/digits/version_0/checkpoints/{name}.ckpt", weights_only=True)["state_dict"]
        for folder, name in ((whole, "epoch1"), (first, "epoch1"))
    )
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0
