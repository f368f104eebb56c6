"""The benchmark scripts the other benchmark tests do not run (digits.py, attention_faithfulness.py) and the README's
variants of the others (a real `--data-dir`, `--in-memory`), each in a tiny mode, and their usage errors: one line,
before any work. The figures they print are measurements: only the shape of the report is checked."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from _images import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


@pytest.fixture(autouse=True)
def _benchmarks_importable(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the scripts import `common` as a sibling
    monkeypatch.chdir(tmp_path)


def readme_table_heading(command: str) -> str:
    """The heading row of the README table that follows `command`."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(command) :]
    return next(line for line in after.splitlines() if line.startswith("| "))


# each script's first step of real work, which a bad --data-dir must never reach
FIRST_WORK = {"predict": "make_jpegs", "data_pipeline": "compare", "loop_overhead": "Setting"}


@pytest.mark.parametrize(
    ("script", "make", "message"),
    [
        ("predict", None, "no such folder"),
        ("data_pipeline", None, "no such folder"),
        ("data_pipeline", "empty", "no class folders"),
        ("loop_overhead", "no images", "no images found"),
    ],
)
def test_a_data_dir_that_is_no_image_folder_is_one_usage_line_before_any_work(
    script, make, message, tmp_path, capsys, monkeypatch
):
    folder = tmp_path / "train"
    if make:
        (folder / "a").mkdir(parents=True)
        (folder / "b").mkdir()
        if make == "no images":
            (folder / "a" / "notes.txt").write_text("not an image")
        else:
            folder = folder / "a"
    module = __import__(script)
    monkeypatch.setattr(module, FIRST_WORK[script], lambda *a, **k: pytest.fail("started the benchmark"))
    with pytest.raises(SystemExit) as stop:
        module.main(["--data-dir", str(folder), "--quick"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # the prog name is pytest's here: 'pytest', or '-c' in an xdist worker
    assert f": error: argument --data-dir: {folder}: {message}" in err


class _Reached(Exception):
    """The script got to its first real work, with these arguments."""


# script, its options after --quick (one explicit value 3), the first function handed it, functions before it to skip
EXPLICIT_OVER_QUICK = [
    ("data_pipeline", ["--settings", "digits", "--rounds", "3"], "compare", ()),
    ("loop_overhead", ["--settings", "digits", "--rounds", "3"], "compare", ()),
    ("flops", ["--models", "vit_tiny_patch16_224", "--rounds", "3"], "interleaved", ()),
    ("speed", ["--only", "train", "--rounds", "3"], "interleaved", ()),
    ("throughput", ["--models", "vit_tiny_patch16_224", "--rounds", "3"], "compare", ()),
    ("memory", ["--batch-size", "3"], "measure", ()),
    ("predict", ["--images", "3"], "make_jpegs", ()),
    ("gpu", ["--rounds", "3"], "throughput", ("smoke",)),
]


@pytest.mark.parametrize(("script", "options", "first_work", "skipped"), EXPLICIT_OVER_QUICK)
def test_an_option_given_explicitly_wins_over_quicks_defaults(script, options, first_work, skipped, monkeypatch):
    module = __import__(script)

    def reached(*args, **kwargs):
        raise _Reached([*args, *kwargs.values()])

    monkeypatch.setattr(module, first_work, reached)
    for name in skipped:
        monkeypatch.setattr(module, name, lambda *a, **k: None)
    with pytest.raises(_Reached) as work:
        module.main(["--quick", *options])
    given = work.value.args[0]
    given += [value for arg in given if isinstance(arg, argparse.Namespace) for value in vars(arg).values()]
    assert 3 in given, given


def test_quick_still_sets_the_options_not_given(monkeypatch):
    import data_pipeline

    calls = []
    monkeypatch.setattr(data_pipeline, "compare", lambda *args: calls.append(args) or "")
    assert data_pipeline.main(["--quick", "--settings", "digits", "--rounds", "3"]) == 0
    (_name, _folder, _label, rounds, batches, batch_size, _in_memory), *_ = calls
    assert (rounds, batches, batch_size) == (3, 2, 8)  # --rounds given; --quick's 2 batches of 8


def test_loop_overhead_refuses_a_run_with_no_timed_epoch(capsys):
    from loop_overhead import main

    with pytest.raises(SystemExit) as stop:
        main(["--settings", "digits", "--epochs", "1"])
    assert stop.value.code == 2
    assert "--epochs must be 2 or more" in capsys.readouterr().err


def test_data_pipeline_on_a_real_folder_in_memory_reports_the_cache(tmp_path, capsys):
    from data_pipeline import main

    write_image_folder(tmp_path / "train", classes=("a", "b", "c"), per_class=12, size=32)
    assert main(["--settings", "imagefolder", "--data-dir", str(tmp_path / "train"), "--in-memory", "--quick"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"set up in {NUMBER} s, cache \(3\d, 3, 32, 32\) torch.uint8", out), out
    assert re.search(rf"loader +{NUMBER} img/s +model +{NUMBER} img/s +loader/model {NUMBER}", out), out


def test_predict_benchmark_takes_its_images_from_a_folder_of_the_users(tmp_path, capsys):
    from predict import main

    write_image_folder(tmp_path / "photos", classes=("a", "b"), per_class=3, size=40)  # any names, not 0000.jpg
    main(["--quick", "--data-dir", str(tmp_path / "photos")])
    out = capsys.readouterr().out
    assert f"8 JPEGs of 224x224 px (from {tmp_path / 'photos'}, resized)" in out
    assert re.search(rf"ratio Predictor / plain loop: {NUMBER}", out) and "top-1 agreement: 8/8" in out


def test_attention_faithfulness_prints_the_readmes_table(capsys):
    from attention_faithfulness import main

    from vit.explain import METHODS

    main(["--epochs", "1", "--seeds", "1", "--steps", "2"])
    out = capsys.readouterr().out.splitlines()
    heading = readme_table_heading("| method | deletion AUC")
    assert heading in out
    rows = out[out.index(heading) + 2 :]
    score = rf"{NUMBER} ± {NUMBER}"
    for method in (*METHODS, "random (mean of 1 seeds)"):
        assert any(re.fullmatch(rf"\| {re.escape(method)} \| {score} \| {score} \|", row) for row in rows), out


def test_digits_benchmark_fits_tests_and_compares_with_scikit_learn(monkeypatch, capsys):
    import digits

    from vit.cli import main as vit_main

    printed = []  # the script's own lines, which a `vit` run's capture would otherwise take

    def in_process(args: list[str], cwd: Path) -> tuple[str, float]:  # `vit ...` without a process start (seconds)
        printed.append(capsys.readouterr().out)
        monkeypatch.chdir(cwd)
        assert vit_main(args) == 0
        return capsys.readouterr().out, 0.0

    monkeypatch.setattr(digits, "vit_command", in_process)
    digits.main(["--quick", "--seeds", "3", "4"])
    out = "".join(printed) + capsys.readouterr().out
    for seed in (3, 4):  # the seeds given win over --quick's one seed; each run is --quick's one short epoch
        assert re.search(
            rf"seed {seed}: `vit fit` {NUMBER} s wall; test accuracy best.ckpt {NUMBER}, last.ckpt {NUMBER}", out
        )
    assert "--seed_everything {3,4} --trainer.max_epochs 1" in out
    for name in ("best.ckpt", "last.ckpt"):
        assert re.search(rf"{name}: test accuracy {NUMBER} ± {NUMBER} .* vit / SVC\(\) = {NUMBER}", out)
    assert re.search(rf"SVC\(\): test accuracy {NUMBER} \(same split", out)
