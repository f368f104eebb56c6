"""The README's main job, measured: `vit fit --config configs/digits.yaml` for several seeds, each followed by
`vit test` on its best checkpoint, against scikit-learn's SVC() and LogisticRegression() on the same fixed split,
all in this one run.

    python benchmarks/digits.py [--seeds 0 1 2] [--config configs/digits.yaml]

Each `vit` command runs as its own process, as a user would run it, so the wall time includes start-up.
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "vit.cli", *args], cwd=cwd, capture_output=True, text=True, env=_env(), check=False
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"vit {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout, seconds


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "digits.yaml")
    args = parser.parse_args()

    reference = baselines()
    accuracies, fit_times = [], []
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            out, seconds = vit_command(
                ["fit", "--config", str(args.config.resolve()), "--seed_everything", str(seed)], Path(work)
            )
            best = re.search(r"best (\S+best\.ckpt)", out).group(1)
            out, _ = vit_command(["test", "--config", str(args.config.resolve()), "--ckpt_path", best], Path(work))
            run = Path(work) / re.search(r"run folder: (\S+)", out).group(1)
            with open(run / "metrics.csv") as f:
                accuracy = next(float(row["test/acc"]) for row in csv.DictReader(f) if row.get("test/acc"))
            accuracies.append(accuracy)
            fit_times.append(seconds)
            print(f"seed {seed}: test accuracy {accuracy:.4f}, `vit fit` wall time {seconds:.1f} s", flush=True)

    mean = statistics.mean(accuracies)
    spread = (max(accuracies) - min(accuracies)) / 2
    print(f"\nvit ({args.config.name}), {len(accuracies)} seeds: test accuracy {mean:.4f} ± {spread:.4f} (half range)")
    wall = f"`vit fit` wall time {statistics.mean(fit_times):.1f} s (max {max(fit_times):.1f} s)"
    print(f"  min {min(accuracies):.4f}  max {max(accuracies):.4f}  {wall}")
    for name, score in reference.items():
        print(f"{name:>22}: test accuracy {score:.4f}; vit / {name} = {mean / score:.4f}")


if __name__ == "__main__":
    main()
