"""Reliability: checkpoints that would run code are refused by every loader, a non-finite loss stops training
without spoiling the checkpoints, and two runs with the same seed agree exactly."""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import _cli
import pytest
import torch
from tiny_checkpoints import tiny_model, write_lightning_ckpt

import vit
from vit.cli import main
from vit.module import ViTClassifier
from vit.weights import CheckpointError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_DIGITS = [*_cli.TINY_DIGITS, "--trainer.limit_val_batches", "1"]


class _Payload:
    """Unpickling this writes a marker file: the attack a checkpoint from a stranger could carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.fixture
def evil(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """(a `vit fit`-style .ckpt that also carries the payload, the marker it would write). The environment
    asks torch to unpickle everything wherever a caller leaves weights_only unset, as Lightning does."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "marker"
    path = write_lightning_ckpt(tmp_path / "evil.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"] = {"model_config": tiny_model().cfg.to_dict(), "model_name": None}
    checkpoint["callbacks"] = {"hook": _Payload(marker)}
    torch.save(checkpoint, path)
    return path, marker


def test_the_payload_is_live_when_unpickled_without_weights_only(evil):
    path, marker = evil
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"  # so a marker-free run below means the payload was refused, not inert


def test_python_loaders_refuse_the_payload(evil):
    path, marker = evil
    with pytest.raises(CheckpointError, match="refused to load"):
        vit.load_pretrained(tiny_model(), path)
    with pytest.raises(CheckpointError, match="refused to load"):
        vit.load_model(path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused to load"):
        ViTClassifier.load_from_checkpoint(path)
    assert not marker.exists()


def commands_reading(checkpoint: str) -> list[list[str]]:
    """Every command that reads a checkpoint, given `checkpoint` (ids: COMMAND_IDS)."""
    return [
        ["predict", "x.png", "--checkpoint", checkpoint],
        ["attention", "x.png", "--checkpoint", checkpoint, "--out", "a.png"],
        ["export", "--checkpoint", checkpoint, "--out", "m.safetensors"],
        ["fit", *TINY_DIGITS, "--ckpt_path", checkpoint],
        ["validate", *TINY_DIGITS, "--ckpt_path", checkpoint],
    ]


COMMAND_IDS = ["predict", "attention", "export", "fit-resume", "validate"]


@pytest.mark.parametrize(
    "command",
    [
        *commands_reading("evil.ckpt"),
        ["fit", *TINY_DIGITS, "--model.model_name", "null", "--model.pretrained", "evil.ckpt"],
    ],
    ids=[*COMMAND_IDS, "fit-pretrained"],
)
def test_every_command_refuses_the_payload_in_one_line(evil, command, capsys):
    from PIL import Image

    _, marker = evil
    Image.new("RGB", (32, 32)).save("x.png")
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "evil.ckpt: refused to load" in err and "Traceback" not in err
    assert not marker.exists() and not Path("a.png").exists() and not Path("m.safetensors").exists()


def _damage(path: Path, how: str) -> None:
    """Flip 8 bytes inside the largest tensor's data (a bad disk, a bad copy), or cut the file in half."""
    data = bytearray(path.read_bytes())
    if how == "cut":
        path.write_bytes(data[: len(data) // 2])
        return
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        member = max((m for m in archive.infolist() if "/data/" in m.filename), key=lambda m: m.file_size)
    # stored uncompressed after its local header: 30 bytes, then the name and the extra field
    name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26 : member.header_offset + 30])
    start = member.header_offset + 30 + name_length + extra_length
    data[start : start + 8] = bytes(b ^ 0xFF for b in data[start : start + 8])
    path.write_bytes(data)


@pytest.fixture(params=["flipped", "cut"])
def damaged(request, tmp_path, monkeypatch) -> Path:
    """A `vit fit`-style .ckpt damaged after it was written."""
    monkeypatch.chdir(tmp_path)
    path = write_lightning_ckpt(tmp_path / "damaged.ckpt")
    original = torch.load(path, weights_only=True)["state_dict"]
    _damage(path, request.param)
    if request.param == "flipped":  # torch.load itself does not notice: it returns other weights
        loaded = torch.load(path, weights_only=True)["state_dict"]
        assert any(not torch.equal(original[k], loaded[k]) for k in original)
    return path


# flipped bytes, or cut short
DAMAGED = r"damaged\.ckpt: (a PyTorch checkpoint that is cut short or damaged|damaged checkpoint)"


def test_python_loaders_refuse_a_damaged_checkpoint(damaged):
    with pytest.raises(CheckpointError, match=DAMAGED):
        vit.load_model(damaged)
    with pytest.raises(CheckpointError, match=DAMAGED):
        ViTClassifier.load_from_checkpoint(damaged)


@pytest.mark.parametrize("command", commands_reading("damaged.ckpt"), ids=COMMAND_IDS)
def test_every_command_refuses_a_damaged_checkpoint_in_one_line(damaged, command, capsys):
    from PIL import Image

    Image.new("RGB", (32, 32)).save("x.png")
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(DAMAGED, err), err
    assert not Path("a.png").exists() and not Path("m.safetensors").exists()


def _fit(*extra: str) -> int:
    return main(["fit", *TINY_DIGITS, "--trainer.limit_train_batches", "3", *extra])


def test_our_checkpoints_load_with_weights_only_and_hold_plain_hyperparameters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _fit("--trainer.max_epochs", "1") == 0
    checkpoint = torch.load("runs/digits/version_0/checkpoints/last.ckpt", weights_only=True)

    def plain(value: object) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (bool, int, float, str))

    assert plain(checkpoint["hyper_parameters"]) and plain(checkpoint["vit"])


def test_resuming_our_own_checkpoint_works_under_weights_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _fit("--trainer.max_epochs", "1") == 0
    last = "runs/digits/version_0/checkpoints/last.ckpt"
    # save_top_k -1: last.ckpt is written after the epoch whatever val/acc did
    assert _fit("--trainer.max_epochs", "2", "--checkpoint.save_top_k", "-1", "--ckpt_path", last) == 0
    resumed = torch.load("runs/digits/version_1/checkpoints/last.ckpt", weights_only=True)
    assert resumed["epoch"] == 1 and resumed["global_step"] == 6  # went on from step 3, not from scratch


def test_resuming_with_more_epochs_says_the_restored_schedule_ends_sooner(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shorter_warmup = ["--model.warmup_epochs", "0.5"]  # 2 steps of the 3 the schedule is planned for
    assert _fit("--trainer.max_epochs", "1", *shorter_warmup) == 0
    assert "LR schedule" not in capsys.readouterr().err  # a fresh schedule: nothing to say
    last = "runs/digits/version_0/checkpoints/last.ckpt"
    assert _fit("--trainer.max_epochs", "2", *shorter_warmup, "--ckpt_path", last) == 0
    err = capsys.readouterr().err
    assert "dirpath has changed" not in err  # the resumed run's own folder: Lightning's note is noise
    warnings = [line for line in err.splitlines() if "LR schedule" in line]
    assert (
        len(warnings) == 1
        and f"resumed from {last} was planned to end at step 3 and this run ends at step 6" in (warnings[0])
    )
    assert "floor after step 3" in warnings[0] and f"--model.pretrained {last}" in warnings[0]


def test_the_resumed_schedule_warning_of_a_run_shorter_than_its_warmup_names_where_the_lr_peaks(
    tmp_path, monkeypatch, capsys
):
    # a quick first run (3 steps) of the digits config, whose 3 warmup epochs are 9 steps, resumed for more epochs:
    # the restored schedule warms up past its planned end, to step 9, and only then drops to its floor
    monkeypatch.chdir(tmp_path)
    assert _fit("--trainer.max_epochs", "1") == 0
    last = "runs/digits/version_0/checkpoints/last.ckpt"
    assert _fit("--trainer.max_epochs", "4", "--trainer.log_every_n_steps", "1", "--ckpt_path", last) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "LR schedule" in line]
    with open("runs/digits/version_1/metrics.csv") as f:  # the LR each resumed step trained with
        lrs = {int(r["step"]): float(r["train/lr"]) for r in csv.DictReader(f) if r["train/lr"]}
    peak = max(lrs.values())
    until = max(step for step, lr in lrs.items() if math.isclose(lr, peak, rel_tol=1e-6))
    assert min(lrs) == 3 and max(lrs) == 11 and until < 11
    assert all(lrs[step] < lrs[step + 1] for step in range(3, until - 1))  # still rising after the planned end
    assert all(lrs[step] == min(lrs.values()) for step in range(until + 1, 12))  # then at the floor
    assert len(warnings) == 1 and f"the LR warms up until step {until}, then drops to its floor" in warnings[0]


def test_a_resumed_run_does_not_warn_about_the_warmup_of_the_schedule_it_replaces(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _fit("--trainer.max_epochs", "1") == 0  # 3 steps of a 9-step warmup: warned about, rightly
    assert "lasts the whole run" in capsys.readouterr().err
    last = "runs/digits/version_0/checkpoints/last.ckpt"
    assert _fit("--trainer.max_epochs", "2", "--ckpt_path", last) == 0  # a fresh 9-step warmup would outlast 6 steps
    err = capsys.readouterr().err
    assert "lasts the whole run" not in err  # the checkpoint's schedule trains, and the next warning describes it
    assert sum("LR schedule resumed" in line for line in err.splitlines()) == 1


def test_the_resumed_schedule_warning_counts_the_steps_done_at_the_old_epoch_size(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _fit("--trainer.max_epochs", "1") == 0  # 3 steps
    last = "runs/digits/version_0/checkpoints/last.ckpt"
    # one more epoch of 2 batches: steps 3 and 4, so training ends at step 5 (not 2 epochs x 2 = 4)
    resumed = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--ckpt_path", last]
    assert main(["fit", *TINY_DIGITS, *resumed]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "LR schedule" in line]
    assert len(warnings) == 1 and "planned to end at step 3 and this run ends at step 5" in warnings[0], warnings
    final = torch.load("runs/digits/version_1/checkpoints/last.ckpt", weights_only=True)
    assert final["global_step"] == 5  # the step the warning named


def test_a_non_finite_loss_stops_training_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    poisoned_from = 4  # epoch 0 is steps 0-2 and ends with a checkpoint; step 4 is the second of epoch 1
    original = ViTClassifier.training_step

    def poisoned(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.global_step >= poisoned_from else loss

    monkeypatch.setattr(ViTClassifier, "training_step", poisoned)
    assert _fit("--trainer.max_epochs", "3") == 1
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if "warning:" not in line)
    assert len(err.splitlines()) == 1 and f"at step {poisoned_from} (epoch 1, batch 1)" in err
    last = tmp_path / "runs/digits/version_0/checkpoints/last.ckpt"
    assert str(last.relative_to(tmp_path)) in err
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 3 and checkpoint["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


def test_a_checkpoint_of_non_finite_weights_is_never_written(tmp_path, monkeypatch, capsys):
    import lightning as L

    monkeypatch.chdir(tmp_path)

    def overflow(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 6:  # the last step of epoch 1, after its optimiser step; its loss was finite
            with torch.no_grad():
                pl_module.model.head.weight.fill_(float("inf"))

    monkeypatch.setattr(L.Callback, "on_train_batch_end", overflow)  # every callback the CLI builds does it
    # save_top_k -1: a checkpoint after every epoch, whatever the score (Lightning writes last.ckpt only then)
    assert _fit("--trainer.max_epochs", "3", "--checkpoint.save_top_k", "-1") == 1
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if "warning:" not in line)
    assert len(err.splitlines()) == 1 and "weights hold NaN or inf at step 6 (epoch 1), e.g. model.head.weight" in err
    folder = tmp_path / "runs/digits/version_0/checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]  # no epoch-1 file
    for name in ("last.ckpt", "best.ckpt"):
        checkpoint = torch.load(folder / name, weights_only=True)
        assert checkpoint["global_step"] == 3
        assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


def test_a_full_disk_stops_training_in_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    save = torch.save

    def full_disk(checkpoint, f, *args, **kwargs):  # as torch's zip writer fails: an OSError, then its own error
        if checkpoint["epoch"] == 0:
            return save(checkpoint, f, *args, **kwargs)
        f.write(b"PK\x03\x04 the first bytes")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0") from None

    monkeypatch.setattr(torch, "save", full_disk)
    assert _fit("--trainer.max_epochs", "2") == 1  # epoch 1 is the last: last.ckpt is due
    err = [line for line in capsys.readouterr().err.splitlines() if "warning:" not in line]
    folder = Path("runs/digits/version_0/checkpoints")
    assert len(err) == 1 and str(folder) in err[0], err
    assert "could not write the checkpoint of epoch 1 (No space left on device)" in err[0]
    assert "untouched" in err[0]
    assert torch.load(folder / "last.ckpt", weights_only=True)["epoch"] == 0
    assert not list(folder.glob(".*.tmp"))


EVERY_STEP = ["--trainer.log_every_n_steps", "1"]  # the training loss of every step goes into metrics.csv
IMAGEFOLDER = [
    "--config",
    str(CONFIGS / "imagefolder.yaml"),
    "--model.img_size",
    "16",
    "--model.model_overrides",
    json.dumps({"embed_dim": 16, "depth": 1, "num_heads": 2}),
    "--data.batch_size",
    "8",
    "--data.num_workers",
    "1",  # RandAugment, flips and erasing drawn in a worker process
    "--trainer.enable_progress_bar",
    "false",
]


@pytest.mark.parametrize("data", ["digits", "imagefolder"])
def test_two_runs_with_the_same_seed_give_identical_metrics_and_weights(tmp_path, monkeypatch, data):
    from _images import write_image_folder

    train = write_image_folder(tmp_path / "train", per_class=8)
    runs = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        seeded = [*EVERY_STEP, "--seed_everything", seed]
        if data == "digits":
            assert _fit("--trainer.max_epochs", "2", *seeded) == 0
        else:
            assert (
                main(["fit", *IMAGEFOLDER, *seeded, "--data.train_dir", str(train), "--trainer.max_epochs", "2"]) == 0
            )
        run = Path(f"runs/{data}/version_0")
        checkpoint = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
        runs.append(((run / "metrics.csv").read_text(), checkpoint["state_dict"]))
    (metrics_a, weights_a), (metrics_b, weights_b), (metrics_c, _) = runs
    assert "val/acc" in metrics_a and "train/loss" in metrics_a and metrics_a == metrics_b
    assert metrics_c != metrics_a  # the seed does steer the run, so agreement above is no accident
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_the_speed_probe_finds_bfloat16_slow_where_onednn_cannot_run_it():
    # ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN (and so torch) act as on a CPU without bfloat16 support, whatever this
    # machine has: torch then multiplies bfloat16 matrices with its scalar fallback (measured: 1/77 of float32)
    code = (
        "import torch; from vit.precision import matmul_speedup; "
        "print(torch.ops.mkldnn._is_mkldnn_bf16_supported(), matmul_speedup(torch.bfloat16))"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": str(CONFIGS.parent)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    supported, speedup = out.split()
    if supported != "False":
        pytest.skip("this torch build ignores ONEDNN_MAX_CPU_ISA (not x86, or no oneDNN)")
    assert float(speedup) < 1


@pytest.mark.parametrize(
    ("precision", "speedup", "warns"), [("bf16-mixed", 0.2, True), ("bf16-mixed", 1.8, False), ("bf16-true", 0.2, True)]
)
def test_fit_warns_once_when_the_cpu_can_only_emulate_the_half_precision_asked_for(
    tmp_path, monkeypatch, capsys, precision, speedup, warns
):
    import vit.precision

    monkeypatch.chdir(tmp_path)
    probed = []
    monkeypatch.setattr(vit.precision, "matmul_speedup", lambda dtype: probed.append(dtype) or speedup)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert _fit("--trainer.max_steps", "1", "--trainer.precision", precision) == 0
    ours = [line for line in capsys.readouterr().err.splitlines() if "is slow here" in line]  # as a user sees it
    assert probed == [torch.bfloat16]
    assert ours == (
        [
            f"vit fit: warning: precision {precision} is slow here: a bfloat16 matrix product ran 5.0 times "
            "slower than a float32 one on this CPU (bfloat16 is fast only on CPUs with AMX); pass --trainer.precision "
            "32-true"
        ]
        if warns
        else []
    )


def test_fit_in_float32_never_probes_the_cpu(tmp_path, monkeypatch):
    import vit.precision

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(vit.precision, "matmul_speedup", lambda dtype: pytest.fail("probed in float32"))
    assert _fit("--trainer.max_steps", "1") == 0
