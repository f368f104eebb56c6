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
from functools import partial

import timm
import torch
from common import check_same_logits, interleaved, model_pair, parse_args, speedup


def forward_passes(model: torch.nn.Module, x: torch.Tensor, passes: int) -> None:
    """`passes` forward passes of `x`: one timing."""
    for _ in range(passes):
        model(x)


def compare(name: str, batch: int, rounds: int, iters: int, warmup: int, **overrides: int) -> dict[str, float]:
    """Median images/s of ours and timm's, and per-round ratios (median, quartiles) of ours/timm and of a
    second timm copy/timm: the control, which shows how far two identical models drift apart on this machine."""
    ours, reference = model_pair(name, **overrides)
    control = timm.create_model(name, **overrides)
    control.load_state_dict(reference.state_dict(), strict=True)
    models = {"ours": ours, "timm": reference, "timm#2": control.eval()}
    x = torch.randn(batch, *reference.pretrained_cfg["input_size"])
    check_same_logits(ours, reference, x, tol=1e-4, name=name)
    with torch.inference_mode():
        for model in models.values():
            forward_passes(model, x, warmup)
        runs = {key: partial(forward_passes, model, x, iters) for key, model in models.items()}
        times = interleaved(runs, rounds, warmup=0)
    out = {key: statistics.median(batch * iters / t for t in v) for key, v in times.items()}
    for key in ("ours", "timm#2"):
        out[f"{key}/timm"], out[f"{key}/timm q1"], out[f"{key}/timm q3"] = speedup(times, key, "timm")
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
