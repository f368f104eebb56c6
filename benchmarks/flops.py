"""Distance to the limit: a model's inference FLOP/s as a share of torch.mm's on 2048 x 2048 matrices.

    python benchmarks/flops.py                           # ViT-Ti/16 and ViT-S/16 at 224, batch 16
    python benchmarks/flops.py --models vit_small_patch16_224 --batch-size 32 --rounds 30
    python benchmarks/flops.py --quick                   # seconds: keeps the script from rotting

FLOPs of one forward pass come from torch.utils.flop_counter.FlopCounterMode (GEMMs, convolution, attention;
2 per multiply-add); under the counter our model takes the plain aten ops, and must count the same as timm's.
Each round times ours, timm's and one torch.mm (same threads, rotating order); a model's share is its FLOP/s
over that round's torch.mm FLOP/s, and the median over rounds is printed.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import check_same_logits, header, interleaved, model_pair
from speed import inference_step
from torch.utils.flop_counter import FlopCounterMode

MM_SIZE = 2048


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one inference forward pass, as FlopCounterMode counts them."""
    with torch.inference_mode(), FlopCounterMode(display=False) as c:
        model.eval()(x)
    return c.get_total_flops()


def main(argv: list[str] | None = None) -> int:
    """Print GFLOPs per image, achieved GFLOP/s and the share of the torch.mm rate, for ours and timm's."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224", "vit_small_patch16_224"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: depth 1, batch 2, 2 rounds")
    args = parser.parse_args(argv)
    depth = {"depth": 1} if args.quick else {}
    if args.quick:
        args.batch_size, args.rounds = 2, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    a, b = torch.randn(MM_SIZE, MM_SIZE), torch.randn(MM_SIZE, MM_SIZE)
    mm_flops = 2 * MM_SIZE**3
    print(f"{header()}, batch {args.batch_size}, {args.rounds} rounds; peak = torch.mm {MM_SIZE}x{MM_SIZE}")
    for name in args.models:
        ours, reference = model_pair(name, **depth)
        x = torch.randn(args.batch_size, *ours.pretrained_cfg["input_size"])
        check_same_logits(ours, reference, x)
        flops = forward_flops(reference, x)
        if forward_flops(ours, x) != flops:
            raise SystemExit(f"{name}: FlopCounterMode counts ours and timm's differently")
        steps = {"ours": inference_step(ours, x), "timm": inference_step(reference, x), "mm": lambda: torch.mm(a, b)}
        times = interleaved(steps, args.rounds)
        peak = statistics.median(mm_flops / t for t in times["mm"])
        line = f"{name:<24} {flops / args.batch_size / 1e9:5.2f} GFLOP/img   mm {peak / 1e9:6.1f} GFLOP/s"
        for key in ("ours", "timm"):
            share = statistics.median((flops / t) / (mm_flops / m) for t, m in zip(times[key], times["mm"]))
            line += f"   {key} {flops / statistics.median(times[key]) / 1e9:6.1f} GFLOP/s = {share:5.1%} of mm"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
