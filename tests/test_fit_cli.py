"""`vit fit | validate | test` through the command line: run folders, checkpoints others can read, fine-tuning
from a local checkpoint, and one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _images import CIFAR10_NAMES, write_cifar10, write_cifar100, write_image_folder
from timm.layers import resample_abs_pos_embed

import vit
from vit.cli import main
from vit.module import ViTClassifier

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_DIGITS = ["--model.model_overrides", json.dumps({"in_chans": 1, "embed_dim": 16, "depth": 1, "num_heads": 2})]
QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run folders land in ./runs


def read_losses(run: Path) -> list[float]:
    with open(run / "metrics.csv") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def test_fit_writes_a_run_folder_whose_checkpoints_every_loader_accepts(capsys):
    assert main(["fit", "--config", str(CONFIGS / "digits.yaml"), *TINY_DIGITS, *QUICK]) == 0
    run = Path("runs/digits/version_0")
    best, last = run / "checkpoints" / "best.ckpt", run / "checkpoints" / "last.ckpt"
    assert best.is_file() and last.is_file() and (run / "metrics.csv").is_file()
    out = capsys.readouterr().out
    assert f"run folder: {run}" in out and "val/acc" in out

    module = ViTClassifier.load_from_checkpoint(best).eval()
    model, checkpoint = vit.load_model(best)
    fresh = vit.VisionTransformer(vit.ViTConfig(**checkpoint.model_config))
    vit.load_pretrained(fresh, best)
    assert checkpoint.class_names == [str(d) for d in range(10)]
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(module(x), model.eval()(x), atol=1e-6)
        assert torch.allclose(module(x), fresh.eval()(x), atol=1e-6)


def test_the_final_report_prints_a_small_learning_rate_as_the_value_it_is(capsys):
    # e.g. the end of a schedule (lr * min_lr_ratio), which four decimals printed as 0.0000
    every_step = ["--trainer.log_every_n_steps", "1", "--model.lr", "1e-4"]
    assert main(["fit", "--config", str(CONFIGS / "digits.yaml"), *TINY_DIGITS, *QUICK, *every_step]) == 0
    report = capsys.readouterr().out.split("final metrics: ")[1].split()
    printed = dict(zip(report[::2], map(float, report[1::2])))
    with open("runs/digits/version_0/metrics.csv") as f:
        logged = [float(row["train/lr"]) for row in csv.DictReader(f) if row.get("train/lr")][-1]
    assert 0 < logged < 1e-3 and printed["train/lr"] == pytest.approx(logged, rel=1e-3)


def test_a_fresh_process_prints_none_of_lightnings_notes_that_ask_nothing_of_the_user(tmp_path):
    # a new process, since Python shows a warning once per place: an earlier test could have used it up
    command = [sys.executable, "-m", "vit.cli", "fit", "--config", str(CONFIGS / "digits.yaml"), *TINY_DIGITS, *QUICK]
    command += ["--trainer.precision", "bf16-mixed"]  # as the CIFAR recipes: Lightning's summary warns about it
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | {"PYTHONPATH": str(CONFIGS.parent)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "run folder:" in output and "Seed set to 0" in output  # Lightning's own lines still come through
    assert "litlogger" not in output and "LeafSpec" not in output and "Traceback" not in output
    assert "not supported by the model summary" not in output


def test_checkpointing_turned_off_trains_without_writing_checkpoints(capsys):
    # Lightning refuses enable_checkpointing=False beside a ModelCheckpoint: vit fit must then add none of its own
    off = ["--trainer.enable_checkpointing", "false"]
    assert main(["fit", "--config", str(CONFIGS / "digits.yaml"), *TINY_DIGITS, *QUICK, *off]) == 0
    run = Path("runs/digits/version_0")
    assert (run / "metrics.csv").exists() and not (run / "checkpoints").exists()
    assert "checkpoints: none (--trainer.enable_checkpointing false)" in capsys.readouterr().out


def test_a_run_folder_that_cannot_be_made_is_one_line_naming_it(capsys):
    Path("runs").write_text("a file where the run folders go")  # as a read-only or full file system refuses them
    assert main(["fit", "--config", str(CONFIGS / "digits.yaml"), *TINY_DIGITS, *QUICK]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"vit fit: error: {Path('runs/digits').resolve()}: Not a directory"
    assert not any("Traceback" in line for line in err)


def test_last_checkpoint_is_the_final_model_even_when_the_best_is_older():
    # monitoring 'epoch' in min mode makes epoch 0 the best for good; last.ckpt must still follow every epoch
    never_better = ["--checkpoint.monitor", "epoch", "--checkpoint.mode", "min", "--trainer.max_epochs", "3"]
    assert main(["fit", "--config", str(CONFIGS / "digits.yaml"), *TINY_DIGITS, *QUICK, *never_better]) == 0
    folder = Path("runs/digits/version_0/checkpoints")
    assert torch.load(folder / "best.ckpt", weights_only=True)["global_step"] == 3
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 9


def test_a_later_epoch_that_ties_the_best_score_becomes_best_ckpt():
    # with lr 0 the weights never change, so every epoch ties on val/acc; Lightning alone would keep epoch 0
    frozen = ["--model.lr", "0", "--trainer.max_epochs", "3"]
    assert main(["fit", "--config", str(CONFIGS / "digits.yaml"), *TINY_DIGITS, *QUICK, *frozen]) == 0
    folder = Path("runs/digits/version_0/checkpoints")
    assert torch.load(folder / "best.ckpt", weights_only=True)["global_step"] == 9


def test_validate_and_test_restore_the_model_from_the_checkpoint_alone(capsys):
    assert main(["fit", "--config", str(CONFIGS / "digits.yaml"), *TINY_DIGITS, *QUICK]) == 0
    best = "runs/digits/version_0/checkpoints/best.ckpt"
    # no model overrides: the architecture comes from the checkpoint's hyperparameters
    assert main(["test", "--config", str(CONFIGS / "digits.yaml"), "--ckpt_path", best]) == 0
    out, err = capsys.readouterr()
    assert "test/acc" in out and "dirpath has changed" not in err  # Lightning's note about checkpoints it won't write
    assert main(["validate", "--config", str(CONFIGS / "digits.yaml"), "--ckpt_path", best]) == 0
    assert "val/acc" in capsys.readouterr().out


def test_fine_tuning_from_a_local_checkpoint_resamples_positions_and_resets_the_head(tmp_path):
    write_image_folder(tmp_path / "a", classes=("r", "g", "b"), per_class=8, size=16)
    write_image_folder(tmp_path / "b", classes=("b", "r"), per_class=12, size=24, seed=1)
    tiny = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 3}
    pretrain = ["--model.model_name", "null", "--model.model_config", json.dumps(tiny), "--data.num_workers", "0"]
    assert main(["fit", "--config", str(CONFIGS / "imagefolder.yaml"), "--data.train_dir", str(tmp_path / "a"),
                 *pretrain, "--trainer.max_epochs", "2"]) == 0  # fmt: skip
    source = Path("runs/imagefolder/version_0/checkpoints/last.ckpt")
    source_state = vit.read_checkpoint(source).state_dict

    # At construction: weights from the file, position embeddings resampled from a 4x4 to a 6x6 grid.
    start = ViTClassifier(model_name=None, pretrained=str(source), img_size=24)
    expected_pos = resample_abs_pos_embed(source_state["pos_embed"], [6, 6], [4, 4], num_prefix_tokens=1)
    assert torch.allclose(start.model.pos_embed, expected_pos)
    assert torch.equal(start.model.blocks[1].mlp.fc2.weight, source_state["blocks.1.mlp.fc2.weight"])

    finetune = [
        *("--model.model_name", "null", "--model.pretrained", str(source), "--model.img_size", "24"),
        *("--model.ema_decay", "null", "--model.lr", "2e-3", "--model.model_overrides", "{}"),
        *("--data.train_dir", str(tmp_path / "b"), "--data.batch_size", "4", "--data.num_workers", "0"),
        *("--data.auto_augment", "null", "--data.re_prob", "0", "--data.scale", "[0.7, 1.0]"),
        *("--trainer.max_epochs", "6", "--trainer.log_every_n_steps", "1"),
    ]
    assert main(["fit", "--config", str(CONFIGS / "finetune.yaml"), *finetune]) == 0
    run = Path("runs/finetune/version_0")
    tuned = vit.read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert tuned.state_dict["head.weight"].shape == (2, 32)  # new head for the two classes
    assert tuned.state_dict["pos_embed"].shape == (1, 1 + 36, 32)
    assert tuned.class_names == ["b", "r"] and tuned.data_config["input_size"] == [3, 24, 24]
    losses = read_losses(run)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_pretrained_true_means_timms_default_weights_for_model_name(tmp_path, monkeypatch, capsys):
    # the digits variant is ours, so timm has no weights for it: the error names the variant, not a file 'true'
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("socket.create_connection", lambda *a, **k: pytest.fail("asked the network"))
    assert main(["fit", "--config", str(CONFIGS / "digits.yaml"), "--model.pretrained", "true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vit fit: error: ") and err.count("\n") == 0
    assert "vit_nano_patch4_32: timm has no pretrained weights of that name" in err


def test_model_name_with_a_tag_timm_lacks_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    name = "vit_tiny_patch16_224.nosuchtag"
    assert main(["fit", "--config", str(CONFIGS / "digits.yaml"), "--model.model_name", name]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vit fit: error: {name}: timm has no pretrained tag 'nosuchtag'") and "\n" not in err


def test_print_config_shows_the_resolved_configuration(capsys):
    assert main(["fit", "--config", str(CONFIGS / "digits.yaml"), "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "model_name: vit_nano_patch4_32" in out and "class_path: vit.data.DigitsDataModule" in out


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_parses(config, capsys):
    assert main(["fit", "--config", str(CONFIGS / config), "--print_config"]) == 0
    assert "class_path: vit.data." in capsys.readouterr().out


def test_every_config_is_trained_for_a_step_by_a_test_in_this_file():
    # issue 7: a config that only parses can still rot (a renamed option, a class that no longer fits its data)
    source = Path(__file__).read_text()
    untrained = [
        p.name for p in CONFIGS.glob("*.yaml") if f'main(["fit", "--config", str(CONFIGS / "{p.name}")' not in source
    ]
    assert not untrained


def test_cifar10_config_trains_on_a_local_copy_with_mixup(tmp_path):
    write_cifar10(tmp_path / "data")
    tiny = {"embed_dim": 32, "depth": 1, "num_heads": 2}
    args = ["--data.data_dir", str(tmp_path / "data"), "--data.download", "false", "--data.num_workers", "0"]
    args += ["--data.batch_size", "8", "--model.model_overrides", json.dumps(tiny), *QUICK]
    assert main(["fit", "--config", str(CONFIGS / "cifar10.yaml"), *args]) == 0
    checkpoint = vit.read_checkpoint("runs/cifar10/version_0/checkpoints/last.ckpt")
    assert checkpoint.class_names == CIFAR10_NAMES and checkpoint.model_config["depth"] == 1


def test_cifar100_config_trains_on_a_local_copy_with_its_hundred_classes(tmp_path):
    names = write_cifar100(tmp_path / "data")
    tiny = {"embed_dim": 32, "depth": 1, "num_heads": 2}
    args = ["--data.data_dir", str(tmp_path / "data"), "--data.download", "false", "--data.num_workers", "0"]
    args += ["--data.batch_size", "8", "--model.model_overrides", json.dumps(tiny), *QUICK]
    assert main(["fit", "--config", str(CONFIGS / "cifar100.yaml"), *args]) == 0
    checkpoint = vit.read_checkpoint("runs/cifar100/version_0/checkpoints/last.ckpt")
    assert checkpoint.class_names == names and checkpoint.state_dict["head.weight"].shape == (100, 32)


def test_cifar10_gpu_config_trains_its_conv_stem_vit_on_a_cpu_when_told_to(tmp_path):
    # the recipe as committed, less what needs a GPU (the accelerator, bf16 at speed, compiling for minutes)
    write_image_folder(tmp_path / "train", classes=CIFAR10_NAMES, per_class=4, size=32)
    cpu = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--model.compile", "false"]
    one_step = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"]
    args = ["--data.train_dir", str(tmp_path / "train"), "--data.batch_size", "8", *cpu, *one_step]  # ViT-S: 14M
    assert main(["fit", "--config", str(CONFIGS / "cifar10_gpu.yaml"), *args]) == 0
    model, checkpoint = vit.load_model("runs/cifar10_gpu/version_0/checkpoints/last.ckpt")
    assert model.cfg.conv_stem == (64, 128) and model.cfg.embed_dim == 384 and model.cfg.depth == 8
    assert model.cfg.img_hw == (32, 32) and checkpoint.class_names == sorted(CIFAR10_NAMES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the config runs as committed where there is a GPU")
def test_cifar10_gpu_config_without_a_gpu_says_how_to_run_it_on_the_cpu(tmp_path, capsys):
    write_image_folder(tmp_path / "train", classes=CIFAR10_NAMES, per_class=2, size=32)
    assert (
        main(["fit", "--config", str(CONFIGS / "cifar10_gpu.yaml"), "--data.train_dir", str(tmp_path / "train")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vit fit: error: No supported gpu backend found! (this machine has no GPU: add ")
    assert "--trainer.accelerator cpu" in err


def test_cifar10_cpu_config_trains_a_conv_stem_vit_from_memory_within_its_budget(tmp_path):
    write_image_folder(tmp_path / "train", classes=CIFAR10_NAMES, per_class=4, size=32)
    args = ["--data.train_dir", str(tmp_path / "train"), "--data.batch_size", "8", *QUICK]
    assert main(["fit", "--config", str(CONFIGS / "cifar10_cpu.yaml"), *args]) == 0
    model, checkpoint = vit.load_model("runs/cifar10_cpu/version_0/checkpoints/last.ckpt")
    assert model.cfg.conv_stem == (32, 64, 128) and model.cfg.patch_size == 8
    assert checkpoint.class_names == sorted(CIFAR10_NAMES)


def test_a_misspelt_model_override_is_one_line_naming_it_and_the_field_meant(capsys):
    override = ["--model.model_overrides", "{deptth: 2}"]
    assert main(["fit", "--config", str(CONFIGS / "digits.yaml"), *override]) == 2
    err = capsys.readouterr().err
    assert err == "vit fit: error: 'deptth' is not a ViTConfig field; did you mean 'depth'?\n"


@pytest.mark.parametrize("command", ["fit", "test"])
def test_a_command_without_a_config_names_itself_and_says_what_is_missing(command, capsys):
    assert main([command]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"usage: vit {command} --config CONFIG [--model.* ...] [--data.* ...] [--trainer.* ...]"
    assert err[1].endswith(f"vit {command} --help")
    assert err[2] == "error: no data: give --config CONFIG (e.g. configs/digits.yaml)"


def test_unknown_config_key_is_lightning_clis_own_error(tmp_path, capsys):
    assert main(["fit", "--config", str(CONFIGS / "digits.yaml"), "--model.no_such_option", "1"]) == 2
    err = capsys.readouterr().err.splitlines()  # one usage line, not every option of Trainer, model and data
    assert err[0].startswith("usage: ") and err[0].endswith(
        " fit --config CONFIG [--model.* ...] [--data.* ...] [--trainer.* ...]"
    )
    assert len(err) == 3 and err[-1] == "error: unrecognized arguments: --model.no_such_option 1"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  learning_rate_typo: 0.1\n")
    assert main(["fit", "--config", str(CONFIGS / "digits.yaml"), "--config", str(bad)]) == 2
    assert "learning_rate_typo" in capsys.readouterr().err


def test_train_dir_without_images_is_one_line_naming_the_folder(tmp_path, capsys):
    empty = tmp_path / "photos"
    (empty / "cats").mkdir(parents=True)
    (empty / "dogs").mkdir()
    assert main(["fit", "--config", str(CONFIGS / "imagefolder.yaml"), "--data.train_dir", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"vit fit: error: {empty}: no images found")


def test_a_missing_train_dir_is_one_line_naming_it_not_jsonargparses_wrapper(tmp_path, capsys):
    # jsonargparse wraps the data module's own error in "Does not validate against any of the Union subtypes"
    missing = tmp_path / "no_such_photos"
    assert main(["fit", "--config", str(CONFIGS / "imagefolder.yaml"), "--data.train_dir", str(missing)]) == 2
    assert capsys.readouterr().err == f"vit fit: error: {missing}: no such folder\n"


@pytest.mark.parametrize("policy", ["randx", "rand-zz9", "augmixx", "nonsense"])
def test_an_augmentation_policy_timm_cannot_parse_is_one_line_before_any_training(policy, tmp_path, capsys):
    # timm's parser asserts (a bare AssertionError, a traceback) only when setup builds the training transform
    write_image_folder(tmp_path / "photos", ("cat", "dog"), per_class=4, size=16)
    argv = ["--data.train_dir", str(tmp_path / "photos"), "--data.auto_augment", policy]
    assert main(["fit", "--config", str(CONFIGS / "imagefolder.yaml"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"vit fit: error: auto_augment={policy!r}: not a timm augmentation")
    assert not Path("runs").exists()


def test_cifar_download_that_fails_offline_is_one_line_naming_the_folder_and_the_fix(tmp_path, monkeypatch, capsys):
    import urllib.error

    import torchvision.datasets.utils

    def offline(url, download_root, *args, **kwargs):
        os.makedirs(download_root, exist_ok=True)  # as torchvision does before it asks the network
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))  # what an offline machine raised

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    assert main(["fit", "--config", str(CONFIGS / "cifar10.yaml"), "--data.data_dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"vit fit: error: {tmp_path / 'data' / 'cifar-10-batches-py'}: no CIFAR10 copy, and downloading"
    )
    assert err.endswith("Name or service not known>); pass --data.data_dir a folder that holds cifar-10-batches-py/\n")
    assert err.count("\n") == 1
    assert not (tmp_path / "data").exists()  # the failed download leaves no empty folder behind


def test_an_option_lightning_refuses_is_one_line_not_a_traceback(capsys):
    assert main(["fit", "--config", str(CONFIGS / "digits.yaml"), "--trainer.max_epochs", "-3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vit fit: error: `max_epochs` must be a non-negative integer") and err.count("\n") == 1


def test_class_count_mismatch_is_one_clear_line(capsys):
    assert main(["fit", "--config", str(CONFIGS / "digits.yaml"), *TINY_DIGITS, "--model.num_classes", "5"]) == 2
    err = capsys.readouterr().err
    assert "vit fit: error: the model has num_classes=5 but the data (DigitsDataModule) has 10 classes" in err
    assert "Traceback" not in err


def test_testing_a_checkpoint_on_other_class_names_is_an_error_not_a_score(tmp_path, capsys, caplog):
    write_image_folder(tmp_path / "a", classes=("cat", "dog", "fox"), per_class=4, size=16)
    fit = ["--config", str(CONFIGS / "imagefolder.yaml"), "--data.num_workers", "0", "--data.batch_size", "4"]
    assert main(["fit", *fit, "--data.train_dir", str(tmp_path / "a"), *QUICK]) == 0
    assert "head" not in caplog.text  # from scratch: no "new head" news about a 1000-class head never trained
    err = capsys.readouterr().err  # Lightning's warnings too are one line each, as vit's own
    assert "vit fit: warning: The number of training batches" in err and "warnings.warn(" not in err
    last = "runs/imagefolder/version_0/checkpoints/last.ckpt"
    write_image_folder(tmp_path / "b", classes=("dog", "fox", "zebra"), per_class=4, size=16)  # same count
    other = ["--data.train_dir", str(tmp_path / "b"), "--data.test_dir", str(tmp_path / "b"), "--ckpt_path", last]
    assert main(["test", *fit, *other]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"vit test: error: {last} was trained on the classes cat, dog, fox, but the data has dog, fox, zebra: "
        "its outputs would be scored against other labels\n"
    )
    same = ["--data.train_dir", str(tmp_path / "a"), "--data.test_dir", str(tmp_path / "a"), "--ckpt_path", last]
    assert main(["test", *fit, *same]) == 0


@pytest.mark.parametrize("data_classes", [("cat", "dog", "fox"), ("ant", "bee", "cat")])
def test_a_pretrained_head_follows_the_class_names_not_the_positions(tmp_path, data_classes, caplog):
    tiny = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 3}
    source = vit.VisionTransformer(vit.ViTConfig(**tiny))
    torch.nn.init.normal_(source.head.weight)
    torch.nn.init.normal_(source.head.bias)
    vit.save_safetensors(source, tmp_path / "source.safetensors", class_names=["fox", "cat", "dog"])
    write_image_folder(tmp_path / "data", classes=data_classes, per_class=4, size=16)
    args = [
        *("--config", str(CONFIGS / "imagefolder.yaml"), "--data.train_dir", str(tmp_path / "data")),
        *("--model.model_name", "null", "--model.pretrained", str(tmp_path / "source.safetensors")),
        *("--model.lr", "0", "--model.weight_decay", "0", "--data.num_workers", "0", "--data.batch_size", "4"),
        *("--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"),
    ]
    assert main(["fit", *args]) == 0  # a step at learning rate 0 leaves the weights as they started
    head = vit.read_checkpoint("runs/imagefolder/version_0/checkpoints/last.ckpt").state_dict["head.weight"]
    if data_classes == ("cat", "dog", "fox"):  # the same classes in another order: the rows move with their names
        assert torch.equal(head, source.head.weight.detach()[[1, 2, 0]])
        assert "reordered to the data's class order" in caplog.text
    else:  # other classes: a new head, not fox/cat/dog's rows passed off as ant/bee/cat
        assert not any(torch.equal(head[i], source.head.weight[j].detach()) for i in range(3) for j in range(3))
        assert "a new 3-class head" in caplog.text


def test_a_single_class_folder_is_one_line_at_setup(tmp_path, capsys):
    write_image_folder(tmp_path / "photos", classes=("cat",), per_class=4, size=16)
    assert (
        main(["fit", "--config", str(CONFIGS / "imagefolder.yaml"), "--data.train_dir", str(tmp_path / "photos")]) == 2
    )
    assert capsys.readouterr().err == (
        f"vit fit: error: {tmp_path / 'photos'}: one class folder (cat); a classifier needs two or more\n"
    )


def test_a_class_folder_without_training_images_is_one_line(tmp_path, capsys):
    write_image_folder(tmp_path / "photos", classes=("cat", "dog"), per_class=4, size=16)
    (tmp_path / "photos" / "eel").mkdir()
    assert (
        main(["fit", "--config", str(CONFIGS / "imagefolder.yaml"), "--data.train_dir", str(tmp_path / "photos")]) == 2
    )
    err = capsys.readouterr().err
    assert err == f"vit fit: error: {tmp_path / 'photos'}: no images in the class folder(s) eel\n"
    assert not list(Path("runs").glob("*/version_*"))  # no folder of a run that never started: the next is version_0


def test_a_checkpoint_that_does_not_fit_the_named_variant_says_it_carries_its_own(tmp_path, capsys):
    tiny = vit.VisionTransformer(vit.ViTConfig(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2))
    vit.save_safetensors(tiny, tmp_path / "tiny.safetensors")
    write_image_folder(tmp_path / "data", per_class=4, size=16)
    args = ["--data.train_dir", str(tmp_path / "data"), "--model.pretrained", str(tmp_path / "tiny.safetensors")]
    assert main(["fit", "--config", str(CONFIGS / "imagefolder.yaml"), *args]) == 2  # model_name: vit_nano_patch4_32
    err = capsys.readouterr().err
    assert "does not fit the model" in err and err.endswith("--model.model_name null builds it\n")


@pytest.mark.parametrize(
    ("option", "reason"),
    [
        (["--data.batch_size", "ten"], "data.batch_size: Expected a <class 'int'>. Got value: ten"),
        (["--trainer.max_epochs", "x"], "trainer.max_epochs: expected int or null, got 'x'"),
        (["--model.betas", "abc"], "model.betas: expected list of float or null, got 'abc'"),
        (["--data.class_path", "vit.data.ImageFolderDataModule"], "--data.train_dir is required"),
        # digits are augmented a batch at a time, without RandAugment: not jsonargparse's NestedArg(...) dump
        (
            ["--data.auto_augment", "randx"],
            "--data.auto_augment: DigitsDataModule has no such option (it takes batch_size, num_workers, "
            "val_fraction, split_seed, preprocessing, re_prob, hflip, scale, degrees)",
        ),
    ],
)
def test_a_value_of_the_wrong_type_is_its_key_and_reason_not_jsonargparses_union_dump(option, reason, capsys):
    assert main(["fit", "--config", str(CONFIGS / "digits.yaml"), *option]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {reason}"


def test_a_warning_said_again_is_shown_once(tmp_path, monkeypatch, capsys):
    # torch warns of more loader workers than cores at each DataLoader() and again at each iter(): four times here
    write_image_folder(tmp_path / "photos", ("cat", "dog"), per_class=8, size=32)
    monkeypatch.setattr(torch._utils, "cpu_count", lambda: 1)  # what torch's check reads: a one-core machine
    argv = ["fit", "--config", str(CONFIGS / "imagefolder.yaml"), "--data.train_dir", str(tmp_path / "photos")]
    argv += ["--data.num_workers", "2", "--data.batch_size", "4", "--trainer.enable_progress_bar", "false", *QUICK]
    argv += ["--model.model_overrides", json.dumps({"embed_dim": 16, "depth": 1, "num_heads": 2})]
    assert main(argv) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "worker processes" in line]
    assert len(warned) == 1 and warned[0].startswith("vit fit: warning: This DataLoader will create 2 worker")


@pytest.mark.parametrize("asked", [[], ["--float32_matmul_precision", "highest"]])
def test_on_a_gpu_float32_products_run_at_the_precision_asked_tf32_by_default(asked, monkeypatch):
    # no GPU here: torch says there is one until the precision is set, then the fit runs on the CPU
    set_to: list[str] = []
    no_gpu = torch.cuda.is_available

    def set_precision(precision: str) -> None:
        set_to.append(precision)
        monkeypatch.setattr(torch.cuda, "is_available", no_gpu)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", set_precision)
    cpu = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
    assert main(["fit", "--config", str(CONFIGS / "digits.yaml"), *TINY_DIGITS, *QUICK, *cpu, *asked]) == 0
    assert set_to == [asked[1] if asked else "high"]


def test_on_a_cpu_float32_products_keep_their_precision(monkeypatch):
    set_to: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", set_to.append)
    assert main(["fit", "--config", str(CONFIGS / "digits.yaml"), *TINY_DIGITS, *QUICK]) == 0
    assert set_to == []


def test_with_the_logger_off_the_run_config_never_replaces_the_config_file_read(capsys):
    # no logger: the run folder is the working folder, which holds the user's own config.yaml (with their notes)
    own = (CONFIGS / "digits.yaml").read_text() + "# my notes\n"
    Path("config.yaml").write_text(own)
    no_logger = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    for _ in range(2):
        assert main(["fit", "--config", "config.yaml", *TINY_DIGITS, *QUICK, *no_logger]) == 0
    assert Path("config.yaml").read_text() == own
    for saved in ("config-v1.yaml", "config-v2.yaml"):  # each run's resolved config, in a file of its own
        assert "model_overrides" in Path(saved).read_text()
    assert sorted(p.name for p in Path("checkpoints").iterdir()) == [
        "best-v1.ckpt", "best.ckpt", "last-v1.ckpt", "last.ckpt"
    ]  # fmt: skip


def test_a_run_bounded_by_max_steps_alone_warms_up_over_epochs_and_decays_to_its_last_step():
    # --trainer.max_epochs -1: Lightning's step estimate is max_steps without loading the data, whose epoch length
    # the warmup (in epochs) still needs; the run crashed in configure_optimizers (OverflowError) before the fix
    steps = ["--trainer.max_epochs", "-1", "--trainer.max_steps", "6", "--trainer.limit_train_batches", "4"]
    every = ["--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1", "--model.warmup_epochs", "1"]
    assert main(["fit", "--config", str(CONFIGS / "digits.yaml"), *TINY_DIGITS, *steps, *every]) == 0
    last = torch.load("runs/digits/version_0/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 6
    schedule = last["lr_schedulers"][0]["lr_lambdas"][0]
    assert (schedule["warmup"], schedule["total"]) == (4, 6.0)  # one 4-batch epoch of warmup, then down to step 6


@pytest.mark.parametrize(
    "options, line",
    [
        (
            ["--trainer.limit_val_batches", "0"],  # no validation: val/acc, best.ckpt's metric, is never logged
            "checkpoints: best none (val/acc was never logged)  last runs/digits/version_0/checkpoints/last.ckpt",
        ),
        (["--trainer.fast_dev_run", "true"], "checkpoints: none (--trainer.fast_dev_run writes none)"),
    ],
)
def test_the_final_report_says_which_checkpoint_was_not_written_rather_than_print_a_blank_path(options, line, capsys):
    assert main(["fit", "--config", str(CONFIGS / "digits.yaml"), *TINY_DIGITS, *QUICK, *options]) == 0
    report = [text for text in capsys.readouterr().out.splitlines() if text.startswith("checkpoints:")]
    assert report == [line]


@pytest.mark.parametrize(
    "budget", [[], ["--trainer.callbacks+=vit.budget.TimeBudget", "--trainer.callbacks.minutes", "60"]]
)
def test_max_time_is_said_to_cut_the_lr_schedule_short_and_time_budget_is_not(budget, capsys):
    hour = ["--trainer.max_time", "00:01:00:00"]  # never reached here: the warning comes at the start
    assert main(["fit", "--config", str(CONFIGS / "digits.yaml"), *TINY_DIGITS, *QUICK, *hour, *budget]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "max_time stops training" in line]
    assert len(said) == (0 if budget else 1)
    if said:
        assert said[0].startswith("vit fit: warning: --trainer.max_time stops training wherever the LR")
        assert "--trainer.callbacks+=vit.budget.TimeBudget" in said[0]


def test_seed_everything_null_says_which_values_turn_seeding_off(capsys):
    assert main(["fit", "--config", str(CONFIGS / "digits.yaml"), "--seed_everything", "null"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "seed_everything: expected bool or int, got 'None'; false turns seeding off, true picks a random seed"
        )
    )
