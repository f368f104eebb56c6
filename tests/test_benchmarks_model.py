"""The benchmarks (speed, FLOP share, memory, training-loop overhead, data pipeline) still run end to end in their
--quick mode. The figures they
print are measurements, not specifications: only the shape of the report is checked."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vit

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("speed", "flops", "memory", "loop_overhead", "data_pipeline")
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
    assert any(re.match(rf"train 32px .* ours/timm {NUMBER} \(quartiles", line) for line in out)
    assert any(re.match(rf"train bf16-mixed .* ours/timm {NUMBER} \(quartiles", line) for line in out)
    assert any("largest logit difference" in line for line in out)


def test_flops_script_reports_a_share_of_the_mm_rate_for_both_models(reports):
    out = "\n".join(lines(reports["flops"]))
    for name in ("vit_tiny_patch16_224", "vit_small_patch16_224"):
        shares = "".join(
            rf"\n +{who} +{NUMBER} GFLOP/s = +{NUMBER}% of mm +\(without attention: +{NUMBER}%\)"
            for who in ("ours", "timm")
        )
        assert re.search(
            rf"{name}: {NUMBER} GFLOP/img \({NUMBER} without attention\), mm {NUMBER} GFLOP/s{shares}", out
        )


def test_flop_count_includes_cpu_attention_by_torchs_sdpa_formula(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from flops import forward_flops

    model = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    x = torch.randn(3, 3, 32, 32)
    tokens = 16 + 1  # a 4x4 grid and the class token
    # per block: QK^T and attention @ V, each 2 FLOPs per multiply-add over (B, heads, N, N, head_dim)
    attention = 2 * (2 * 3 * tokens * tokens * 32)
    assert forward_flops(model, x) - forward_flops(model, x, attention=False) == 2 * attention


def test_memory_script_reports_peaks_with_and_without_checkpointing(reports):
    out = lines(reports["memory"])
    for state in ("off", "on "):
        assert any(line.startswith(f"checkpointing {state}") and "ours/timm peak" in line for line in out)


def test_loop_overhead_script_compares_vit_fit_and_lightning_alone_with_a_plain_loop_on_both_settings(reports):
    out = lines(reports["loop_overhead"])
    for setting in ("digits", "imagefolder"):
        for clock in ("wall", "cpu"):
            for side in ("vit fit", "Lightning alone"):
                line = rf"{setting} +{clock} +plain +{NUMBER} img/s +{side} +{NUMBER} img/s +{side}/plain {NUMBER}"
                assert any(re.match(line, line_out) for line_out in out), out


def test_data_pipeline_script_reports_loader_against_model_rates_for_both_data_modules(reports):
    out = lines(reports["data_pipeline"])
    assert any(line.startswith("imagefolder") and "worker(s)" in line for line in out), out
    assert any(line.startswith("digits") and "in memory" in line and "torch.uint8" in line for line in out), out
    rates = [
        line
        for line in out
        if re.search(rf"loader +{NUMBER} img/s +model +{NUMBER} img/s +loader/model {NUMBER}", line)
    ]
    assert len(rates) == 2, out
