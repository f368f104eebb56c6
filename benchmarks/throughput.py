"""Inference throughput of our ViT against timm's, same config and same weights, interleaved in one process.

    python benchmarks/throughput.py                 # vit_tiny_patch16_224 and vit_small_patch16_224, batch 32
    python benchmarks/throughput.py --quick         # a few seconds: keeps the script from rotting

CPU, float32, torch.inference_mode. Each round times ours, timm's and a second copy of timm's back to back
(rotating which goes first), so load from other processes hits all alike; ratios are medians of per-round
ratios. The timm/timm control is the noise floor: two identical models differ by that much on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `vit`, installed or not
from common import parse_args

import vit


def images_per_second(model: torch.nn.Module, x: torch.Tensor, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        model(x)
    return iters * x.shape[0] / (time.perf_counter() - start)


def compare(name: str, batch: int, rounds: int, iters: int, warmup: int, **overrides: int) -> dict[str, float]:
    """Median images/s of ours and timm's, and per-round ratios (median, quartiles) of ours/timm and of a
    second timm copy/timm: the control, which shows how far two identical models drift apart on this machine."""
    reference = timm.create_model(name, **overrides).eval()
    models = {
        "ours": vit.create_model(name, **overrides),
        "timm": reference,
        "timm#2": timm.create_model(name, **overrides),
    }
    for model in models.values():
        model.load_state_dict(reference.state_dict(), strict=True)
        model.eval()
    x = torch.randn(batch, *reference.pretrained_cfg["input_size"])
    speed: dict[str, list[float]] = {key: [] for key in models}
    with torch.inference_mode():
        gap = (models["ours"](x) - reference(x)).abs().max().item()
        if gap > 1e-4:
            raise SystemExit(f"{name}: ours and timm disagree by {gap:.2e}; the comparison would be meaningless")
        for model in models.values():
            images_per_second(model, x, warmup)
        keys = list(models)
        for r in range(rounds):  # rotate who goes first, so drift in machine load hits every model alike
            for key in keys[r % 3 :] + keys[: r % 3]:
                speed[key].append(images_per_second(models[key], x, iters))
    out = {key: statistics.median(v) for key, v in speed.items()}
    for key in ("ours", "timm#2"):
        ratios = [a / b for a, b in zip(speed[key], speed["timm"])]
        out[f"{key}/timm"] = statistics.median(ratios)
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        out[f"{key}/timm q1"], out[f"{key}/timm q3"] = quartiles[0], quartiles[2]
    return out


def main(argv: list[str] | None = None) -> int:
    """Print one line per model: images/s for ours and timm, and ours/timm."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224", "vit_small_patch16_224"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=2, help="forward passes per timing")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--depth", type=int, default=None, help="override the variants' depth")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 2 blocks, batch 2, 2 rounds, 1 thread")
    args = parse_args(parser, argv, depth=2, batch_size=2, rounds=2, iters=1, warmup=1, threads=1)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, float32 CPU, "
        f"batch {args.batch_size}, {args.rounds} rounds x {args.iters} passes"
        + (f", depth {args.depth}" if args.depth else "")
    )
    for name in args.models:
        overrides = {"depth": args.depth} if args.depth else {}
        r = compare(name, args.batch_size, args.rounds, args.iters, args.warmup, **overrides)
        print(
            f"{name:<24} ours {r['ours']:7.1f} img/s   timm {r['timm']:7.1f} img/s   "
            f"ours/timm {r['ours/timm']:.3f} (quartiles {r['ours/timm q1']:.3f}-{r['ours/timm q3']:.3f})   "
            f"control timm/timm {r['timm#2/timm']:.3f} ({r['timm#2/timm q1']:.3f}-{r['timm#2/timm q3']:.3f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
