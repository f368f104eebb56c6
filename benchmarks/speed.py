"""Model speed against timm: inference and a training step, same config and weights, interleaved in one process.

    python benchmarks/speed.py                      # both targets of issue 7
    python benchmarks/speed.py --only infer --rounds 40
    python benchmarks/speed.py --quick              # seconds: keeps the script from rotting

- infer: vit_small_patch16_224, batch 16, torch.inference_mode.
- train: a 32-px ViT (patch 4, dim 192, depth 6), batch 128: forward, cross-entropy, backward, AdamW step.
- train-bf16: the same under CPU bfloat16 autocast (`--trainer.precision bf16-mixed`); fast only on CPUs with
  AMX (run it with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 or AVX2 to see a CPU without).
The ratio is the median of the per-round ratios timm time / our time (> 1: ours is faster), with quartiles.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import SMALL_32, check_same_logits, header, interleaved, model_pair, parse_args, speedup


def inference_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One forward pass without autograd."""
    model.eval()

    def step() -> None:
        with torch.inference_mode():
            model(x)

    return step


def training_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool = False) -> Callable[[], None]:
    """Forward, cross-entropy, backward and an AdamW step, with the optimizer's defaults; the forward under CPU
    bfloat16 autocast (Lightning's `bf16-mixed`) if `bf16`."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return step


def report(label: str, times: dict[str, list[float]], batch: int) -> None:
    """One line: each side's median img/s, and the per-round ratio ours/timm with its quartiles."""
    ours, base = statistics.median(times["ours"]), statistics.median(times["timm"])
    ratio, q1, q3 = speedup(times, "ours", "timm")
    print(
        f"{label:<34} ours {batch / ours:7.1f} img/s   timm {batch / base:7.1f} img/s   "
        f"ours/timm {ratio:.3f} (quartiles {q1:.3f}-{q3:.3f}, {len(times['ours'])} rounds)"
    )


def main(argv: list[str] | None = None) -> int:
    """Print img/s of ours and timm and the speed ratio for each benchmark chosen."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["infer", "train", "train-bf16"], default=None)
    parser.add_argument("--model", default="vit_small_patch16_224", help="the inference model (a shared name)")
    parser.add_argument("--infer-batch", type=int, default=16)
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: depth 1, small batches, 2 rounds")
    args = parse_args(parser, argv, infer_batch=2, train_batch=4, rounds=2)
    depth = {"depth": 1} if args.quick else {}
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(header())
    if args.only in (None, "infer"):
        ours, reference = model_pair(args.model, **depth)
        x = torch.randn(args.infer_batch, *ours.pretrained_cfg["input_size"])
        gap = check_same_logits(ours, reference, x, name=args.model)
        times = interleaved({"ours": inference_step(ours, x), "timm": inference_step(reference, x)}, args.rounds)
        report(f"infer {args.model} b{args.infer_batch}", times, args.infer_batch)
        print(f"{'':<34} largest logit difference {gap:.1e}")
    for only, label, bf16 in (("train", "train 32px d192", False), ("train-bf16", "train bf16-mixed", True)):
        if args.only in (None, only):
            ours, reference = model_pair(**{**SMALL_32, **depth})
            x, y = torch.randn(args.train_batch, 3, 32, 32), torch.randint(0, 10, (args.train_batch,))
            steps = {"ours": training_step(ours, x, y, bf16), "timm": training_step(reference, x, y, bf16)}
            report(f"{label} b{args.train_batch}", interleaved(steps, args.rounds), args.train_batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
