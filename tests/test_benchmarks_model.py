"""The model benchmarks (speed, FLOP share, memory) still run end to end in their --quick mode. The figures they
print are measurements, not specifications: only the shape of the report is checked."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("speed", "flops", "memory")
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


@pytest.fixture(scope="module")
def reports() -> dict[str, subprocess.CompletedProcess]:
    """Each script's --quick run; started side by side, since each spends most of its time importing torch."""
    running = {
        name: subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in SCRIPTS
    }
    done = {}
    for name, process in running.items():
        out, err = process.communicate(timeout=600)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return done


def lines(report: subprocess.CompletedProcess) -> list[str]:
    assert report.returncode == 0, report.stderr[-3000:]
    return report.stdout.splitlines()


def test_speed_script_reports_inference_and_training_ratios(reports):
    out = lines(reports["speed"])
    assert any(re.match(rf"infer .* ours/timm {NUMBER} \(quartiles", line) for line in out)
    assert any(re.match(rf"train .* ours/timm {NUMBER} \(quartiles", line) for line in out)
    assert any("largest logit difference" in line for line in out)


def test_flops_script_reports_a_share_of_the_mm_rate_for_both_models(reports):
    out = [line for line in lines(reports["flops"]) if line.startswith("vit_")]
    assert len(out) == 2  # ViT-Ti and ViT-S
    for line in out:
        assert re.search(rf"ours +{NUMBER} GFLOP/s = +{NUMBER}% of mm +timm +{NUMBER} GFLOP/s = +{NUMBER}% of mm", line)


def test_memory_script_reports_peaks_with_and_without_checkpointing(reports):
    out = lines(reports["memory"])
    for state in ("off", "on "):
        assert any(line.startswith(f"checkpointing {state}") and "ours/timm peak" in line for line in out)
