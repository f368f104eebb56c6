"""Peak memory of a training step, ours against timm's, with and without gradient checkpointing.

    python benchmarks/memory.py                      # vit_small_patch16_224, batch 32
    python benchmarks/memory.py --quick              # seconds: keeps the script from rotting

Each measurement runs in a fresh child process: build the model and AdamW, take one step (so the gradients and
the optimizer state exist), then reset the kernel's peak-RSS mark (/proc/self/clear_refs) and take a second step.
The figure is that step's peak resident memory above the resident memory before it. glibc is told to serve every
large block by mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the RSS at once and the peak is the
allocator's true high-water mark. "saved" is what autograd keeps for the backward pass (the activations), summed
over distinct storages by a saved-tensors hook: an exact count, free of the allocator.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from common import header, parse_args, vit

MiB = 2**20


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def saved_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes that autograd saves for the backward pass of one forward (distinct storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()  # runs the recomputation too; its own saved tensors go through the hook as well
    return sum(seen.values())


def child(args: argparse.Namespace) -> None:
    """One measurement; prints a JSON line."""
    create = {"ours": vit.create_model, "timm": timm.create_model}[args.child]
    model = create(args.model, **({"depth": args.depth} if args.depth else {})).train()
    model.set_grad_checkpointing(args.checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch_size, *model.pretrained_cfg["input_size"])
    y = torch.randint(0, model.num_classes, (args.batch_size,))

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()
    optimizer.zero_grad()  # the resting state: weights and AdamW's moments, no gradients
    gc.collect()
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, the peak RSS, to the current RSS
    step()
    peak = _rss_kib("VmHWM")
    optimizer.zero_grad()
    saved = saved_bytes(model, x, y)
    print(json.dumps({"peak_mib": (peak - before) / 1024, "saved_mib": saved / MiB, "resting_mib": before / 1024}))


def measure(args: argparse.Namespace, impl: str, checkpointing: bool) -> subprocess.Popen:
    """Start `child` in a fresh interpreter (RSS is per process, so the children may run side by side)."""
    argv = [sys.executable, __file__, "--child", impl, "--model", args.model, "--batch-size", str(args.batch_size)]
    argv += ["--depth", str(args.depth)] if args.depth else []
    argv += ["--checkpointing"] if checkpointing else []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def result(process: subprocess.Popen) -> dict[str, float]:
    """The JSON line a child printed, or exit with its error."""
    out, err = process.communicate()
    if process.returncode:
        raise SystemExit(f"{' '.join(process.args[2:])} failed:\n{err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Print the peak memory of a training step and the saved activations for ours and timm, checkpointing off/on."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--depth", type=int, default=None, help="override the variant's depth")
    parser.add_argument("--quick", action="store_true", help="a smoke test: depth 2, batch 2")
    parser.add_argument("--child", choices=["ours", "timm"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parse_args(parser, argv, depth=2, batch_size=2)
    if args.child:
        child(args)
        return 0
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("this benchmark reads peak RSS from Linux's /proc; it cannot run here")
    print(f"{header()}, {args.model}, batch {args.batch_size}" + (f", depth {args.depth}" if args.depth else ""))
    print("training step (AdamW): peak RSS above the resting state | activations saved for backward")
    runs = {(impl, ckpt): measure(args, impl, ckpt) for ckpt in (False, True) for impl in ("ours", "timm")}
    for checkpointing in (False, True):
        r = {impl: result(runs[impl, checkpointing]) for impl in ("ours", "timm")}
        print(
            f"checkpointing {'on ' if checkpointing else 'off'}   "
            f"ours {r['ours']['peak_mib']:7.0f} MiB | {r['ours']['saved_mib']:6.0f} MiB   "
            f"timm {r['timm']['peak_mib']:7.0f} MiB | {r['timm']['saved_mib']:6.0f} MiB   "
            f"ours/timm peak {r['ours']['peak_mib'] / r['timm']['peak_mib']:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
