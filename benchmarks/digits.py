"""The README's main job, measured: `vit fit --config configs/digits.yaml` for several seeds, each followed by
`vit test` on its best checkpoint, against scikit-learn's SVC() and LogisticRegression() on the same fixed split,
all in this one run.

    python benchmarks/digits.py [--seeds 0 1 2] [--config configs/digits.yaml]
    python benchmarks/digits.py --quick      # one seed, one epoch of two batches: keeps the script from rotting

Each `vit` command runs as its own process, as a user would run it, so the wall time includes start-up.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import parse_args
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

ROOT = Path(__file__).resolve().parents[1]


def baselines() -> dict[str, float]:
    """Test accuracy of scikit-learn's defaults on the split `vit.data.DigitsDataModule` uses."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    return {
        "SVC()": SVC().fit(x_train, y_train).score(x_test, y_test),
        "LogisticRegression()": LogisticRegression(max_iter=5000).fit(x_train, y_train).score(x_test, y_test),
    }


def vit_command(args: list[str], cwd: Path) -> tuple[str, float]:
    """`vit ARGS` in `cwd` as its own process, as a user runs it: (stdout, wall seconds); exits when it fails."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "vit.cli", *args], cwd=cwd, capture_output=True, text=True, env=_env(), check=False
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"vit {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout, seconds


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}


def test_accuracy(checkpoint: str, config: Path, work: Path) -> float:
    """`vit test --ckpt_path checkpoint`, read back from the run's metrics.csv."""
    out, _ = vit_command(["test", "--config", str(config), "--ckpt_path", checkpoint], work)
    run = work / re.search(r"run folder: (\S+)", out).group(1)
    with open(run / "metrics.csv") as f:
        return next(float(row["test/acc"]) for row in csv.DictReader(f) if row.get("test/acc"))


def summary(name: str, values: list[float], reference: dict[str, float]) -> None:
    """One line: the mean test accuracy over the seeds, half its range, and its ratio to each baseline's."""
    mean, spread = statistics.mean(values), (max(values) - min(values)) / 2
    ratios = "  ".join(f"vit / {k} = {mean / v:.4f}" for k, v in reference.items())
    print(f"{name:>10}: test accuracy {mean:.4f} ± {spread:.4f} (half range; min {min(values):.4f})  {ratios}")


QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]


def main(argv: list[str] | None = None) -> None:
    """Print each seed's test accuracies, their mean and spread, and scikit-learn's on the same split."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "digits.yaml")
    parser.add_argument("--quick", action="store_true", help="a smoke test: seed 0, one epoch of 2 batches")
    args = parse_args(parser, argv, seeds=[0])
    config = args.config.resolve()

    reference = baselines()
    results: dict[str, list[float]] = {"best.ckpt": [], "last.ckpt": []}
    fit_times = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seed in args.seeds:
            out, seconds = vit_command(
                ["fit", "--config", str(config), "--seed_everything", str(seed), *(QUICK if args.quick else [])], work
            )
            fit_times.append(seconds)
            paths = re.search(r"best (\S+best\.ckpt)\s+last\s+(\S+last\.ckpt)", out)
            for name, path in zip(results, paths.groups()):
                results[name].append(test_accuracy(path, config, work))
            scores = ", ".join(f"{name} {values[-1]:.4f}" for name, values in results.items())
            print(f"seed {seed}: `vit fit` {seconds:.1f} s wall; test accuracy {scores}", flush=True)

    seeds = ",".join(map(str, args.seeds))
    seeds = f"{{{seeds}}}" if len(args.seeds) > 1 else seeds  # the shell's brace expansion for several
    quick = " " + " ".join(QUICK) if args.quick else ""
    print(f"\nvit fit --config {args.config} --seed_everything {seeds}{quick}, then vit test:")
    for name, values in results.items():
        summary(name, values, reference)
    print(
        f"`vit fit` wall time: mean {statistics.mean(fit_times):.1f} s, max {max(fit_times):.1f} s (start-up included)"
    )
    for name, score in reference.items():
        print(f"{name:>22}: test accuracy {score:.4f} (same split, same run)")


if __name__ == "__main__":
    main()
