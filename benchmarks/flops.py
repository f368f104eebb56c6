"""Distance to the limit: a model's inference FLOP/s as a share of torch.mm's on 2048 x 2048 matrices.

    python benchmarks/flops.py                           # ViT-Ti/16 and ViT-S/16 at 224, batch 16
    python benchmarks/flops.py --models vit_small_patch16_224 --batch-size 32 --rounds 30
    python benchmarks/flops.py --quick                   # seconds: keeps the script from rotting

FLOPs of one forward pass come from torch.utils.flop_counter.FlopCounterMode (GEMMs, convolution, attention;
2 per multiply-add); under the counter our model takes the plain aten ops, and must count the same as timm's.
torch's counter has formulas for the GPU attention kernels only: on CPU, SDPA runs
`_scaled_dot_product_flash_attention_for_cpu`, which it counts as 0 FLOPs. We give that op torch's own SDPA
formula (`sdpa_flop_count`: the two batched products, 4·B·heads·N²·head_dim), which adds 12% to ViT-Ti's count
and 8% to ViT-S's; the share without it is printed too.
Each round times ours, timm's and one torch.mm (same threads, rotating order); a model's share is its FLOP/s
over that round's torch.mm FLOP/s, and the median over rounds is printed.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import check_same_logits, header, interleaved, model_pair, parse_args
from speed import inference_step
from torch.utils.flop_counter import FlopCounterMode

from vit.flops import CPU_ATTENTION  # the op SDPA runs on CPU, counted with torch's formula for the GPU kernels

MM_SIZE = 2048


def forward_flops(model: torch.nn.Module, x: torch.Tensor, attention: bool = True) -> int:
    """FLOPs of one inference forward pass, as FlopCounterMode counts them (CPU attention included unless not
    `attention`)."""
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION if attention else {}) as c:
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
    args = parse_args(parser, argv, batch_size=2, rounds=2)
    depth = {"depth": 1} if args.quick else {}
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    a, b = torch.randn(MM_SIZE, MM_SIZE), torch.randn(MM_SIZE, MM_SIZE)
    mm_flops = 2 * MM_SIZE**3
    print(f"{header()}, batch {args.batch_size}, {args.rounds} rounds; peak = torch.mm {MM_SIZE}x{MM_SIZE}")
    for name in args.models:
        ours, reference = model_pair(name, **depth)
        x = torch.randn(args.batch_size, *ours.pretrained_cfg["input_size"])
        check_same_logits(ours, reference, x, name=name)
        flops, gemm_flops = forward_flops(reference, x), forward_flops(reference, x, attention=False)
        if (forward_flops(ours, x), forward_flops(ours, x, attention=False)) != (flops, gemm_flops):
            raise SystemExit(f"{name}: FlopCounterMode counts ours and timm's differently")
        steps = {"ours": inference_step(ours, x), "timm": inference_step(reference, x), "mm": lambda: torch.mm(a, b)}
        times = interleaved(steps, args.rounds)
        peak = statistics.median(mm_flops / t for t in times["mm"])
        print(
            f"{name}: {flops / args.batch_size / 1e9:.2f} GFLOP/img ({gemm_flops / args.batch_size / 1e9:.2f} "
            f"without attention), mm {peak / 1e9:.1f} GFLOP/s"
        )
        for key in ("ours", "timm"):
            shares = [(mm_flops / m) ** -1 / t for t, m in zip(times[key], times["mm"])]  # per FLOP of the model
            share, gemm_share = (statistics.median(f * s for s in shares) for f in (flops, gemm_flops))
            print(
                f"  {key:<4} {flops / statistics.median(times[key]) / 1e9:6.1f} GFLOP/s = {share:5.1%} of mm"
                f"   (without attention: {gemm_share:5.1%})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
