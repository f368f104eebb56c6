"""One GPU, one run: a smoke test of bf16 training and SDPA kernels, then ours/timm throughput in bf16 on the same
weights, interleaved (inference and a training step of vit_base_patch16_224, eager and optionally compiled).

    python benchmarks/gpu.py [--model vit_base_patch16_224] [--compile] [--quick]

Every figure is a ratio against timm measured in the same process, in alternating order. Without CUDA it says so
in one line and exits with status 1, measuring nothing (`--quick` runs the same code on the CPU, so that the script
cannot rot unseen).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import interleaved, model_pair, parse_args, speedup
from torch.nn.attention import SDPBackend, sdpa_kernel


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """`fn`, then a wait for the GPU to finish it: a timer then measures the work, not its launch."""

    def call() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return call


QUICK = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)  # --quick: seconds


def pair(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, timm's) on the same weights: a shared variant, or 'quick', the tiny config of --quick."""
    return model_pair(**QUICK) if name == "quick" else model_pair(name)


def smoke(device: torch.device, quick: bool) -> None:
    """bf16 logits against timm, each SDPA kernel on our attention, and a few bf16 training steps that learn."""
    dtype = torch.bfloat16
    ours, theirs = (m.to(device).eval() for m in pair("quick" if quick else "vit_tiny_patch16_224"))
    x = torch.randn(8, 3, *ours.cfg.img_hw, device=device)
    with torch.inference_mode():
        exact = (ours(x) - theirs(x)).abs().max().item()
        with torch.autocast(device.type, dtype):
            a, b = ours(x).float(), theirs(x).float()
    print(f"logits vs timm: float32 max |diff| {exact:.2e}; bf16 autocast max |diff| {(a - b).abs().max().item():.2e}")
    backends = [SDPBackend.MATH] + (
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION] if device.type == "cuda" else []
    )
    for backend in backends:
        with sdpa_kernel(backend), torch.autocast(device.type, dtype):
            ours.train()
            loss = ours(x).float().logsumexp(-1).mean()
            loss.backward()
        print(f"SDPA {backend.name}: forward + backward in bf16 ran, loss {loss.item():.4f}")
    ours.zero_grad(set_to_none=True)
    optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=device.type == "cuda")
    y = torch.randint(0, ours.num_classes, (len(x),), device=device)
    losses = []
    for _ in range(3 if quick else 20):  # one fixed batch: a working step drives its loss down
        with torch.autocast(device.type, dtype):
            loss = F.cross_entropy(ours(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    print(f"bf16 training on one batch: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    if not quick and not losses[-1] < losses[0] / 2:
        raise SystemExit("bf16 training did not learn a single batch")


def throughput(name: str, device: torch.device, batch: int, rounds: int, compile_models: bool) -> None:
    """Images/s of ours and timm's in bf16 autocast, inference and training step, interleaved."""
    ours, theirs = (m.to(device) for m in pair(name))
    if compile_models:
        for m in (ours, theirs):
            m.compile()
    x = torch.randn(batch, 3, *ours.cfg.img_hw, device=device)
    y = torch.randint(0, ours.num_classes, (batch,), device=device)
    optimizers = {
        id(m): torch.optim.AdamW(m.parameters(), lr=1e-5, fused=device.type == "cuda") for m in (ours, theirs)
    }

    def infer(model: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16):
                model.eval()(x)

        return synchronized(step, device)

    def train(model: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            model.train()
            with torch.autocast(device.type, torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizers[id(model)].step()
            optimizers[id(model)].zero_grad(set_to_none=True)

        return synchronized(step, device)

    label = f"{name}, bf16 autocast, batch {batch}" + (", torch.compile" if compile_models else ", eager")
    for kind, make in (("inference", infer), ("training step", train)):
        start = time.perf_counter()
        times = interleaved({"ours": make(ours), "timm": make(theirs)}, rounds=rounds, warmup=2)
        med, q1, q3 = speedup(times, "ours", "timm")
        rate = {k: batch / sorted(v)[len(v) // 2] for k, v in times.items()}
        print(
            f"{label}, {kind}: ours {rate['ours']:.0f} img/s, timm {rate['timm']:.0f} img/s; "
            f"ours/timm {med:.3f} (quartiles {q1:.3f}-{q3:.3f}); {time.perf_counter() - start:.0f} s"
        )


def main(argv: list[str] | None = None) -> int:
    """The smoke test, then ours/timm throughput (eager; also compiled with --compile); status 1 without CUDA."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also compare both models under torch.compile")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny run that works on the CPU too: model 'quick', batch 2, 2 rounds"
    )
    args = parse_args(parser, argv, model="quick", batch_size=2, rounds=2)
    if not torch.cuda.is_available() and not args.quick:  # a failure: a GPU job that measured nothing must not pass
        print("gpu.py: no CUDA device found: nothing to measure (--quick runs the script on the CPU)", file=sys.stderr)
        return 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    smoke(device, args.quick)
    throughput(args.model, device, args.batch_size, args.rounds, compile_models=False)
    if args.compile:
        throughput(args.model, device, args.batch_size, args.rounds, compile_models=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
