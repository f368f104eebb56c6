"""benchmarks/gpu.py still runs end to end: its --quick mode runs the same code on the CPU with a tiny model; without
--quick and without a GPU it fails in one line. The figures it prints are measurements, not specifications: only the
shape of the report is checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_smoke_tests_and_reports_ratios_against_timm():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--quick"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert re.search(r"logits vs timm: float32 max \|diff\| \S+; bf16 autocast", out)
    assert "SDPA MATH: forward + backward in bf16 ran" in out
    for kind in ("inference", "training step"):
        assert re.search(rf"bf16 autocast, batch 2, eager, {kind}: .* ours/timm [0-9.]+ \(quartiles", out)


def test_gpu_script_without_a_gpu_says_so_in_one_line_and_fails():
    hidden = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, on a machine with one too
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py")], capture_output=True, text=True, timeout=300, env=hidden
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("gpu.py: no CUDA device found") and done.stderr.count("\n") == 1, done.stderr
