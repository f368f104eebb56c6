"""What the benchmarks share: our model and timm's on the same weights, an interleaved timer and its ratios, and
the command line's pieces (`--quick` defaults that explicit options override, a checked `--data-dir`, the header).

Every figure the benchmarks print is a ratio against a baseline measured in the same process, in alternating order,
so that load from other processes (this machine's two cores are shared) hits both sides alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `vit`, installed or not
import vit

# The training-step target of issue 7: a 32-px ViT, patch 4, dim 192, depth 6 (3 heads of 64).
SMALL_32 = dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, num_classes=10)


def model_pair(name: str | None = None, **kwargs: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, timm's) with identical weights: a variant both know by `name`, or a config from keyword arguments."""
    if name:
        reference = timm.create_model(name, **kwargs)
        ours = vit.create_model(name, **kwargs)
    else:
        reference, ours = TimmViT(**kwargs), vit.VisionTransformer(vit.ViTConfig(**kwargs))
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours, reference


def check_same_logits(
    ours: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor, tol: float = 1e-5, name: str = "the models"
) -> float:
    """The largest logit difference on `x` in inference mode; exits naming `name` when above `tol` (the timing
    would be moot)."""
    with torch.inference_mode():
        gap = (ours.eval()(x) - reference.eval()(x)).abs().max().item()
    if gap > tol:
        raise SystemExit(
            f"{name}: ours and timm disagree by {gap:.2e} > {tol:.0e}; the comparison would be meaningless"
        )
    return gap


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function over `rounds` rounds; each round calls all once, rotating who goes first."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def ratio_spread(ratios: list[float], digits: int = 3) -> str:
    """Per-round ratios as 'median (quartiles q1-q3, range lo-hi, n rounds)'."""
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return (
        f"{statistics.median(ratios):.{digits}f} (quartiles {q[0]:.{digits}f}-{q[2]:.{digits}f}, "
        f"range {min(ratios):.{digits}f}-{max(ratios):.{digits}f}, {len(ratios)} rounds)"
    )


def speedup(times: dict[str, list[float]], ours: str, base: str) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratio base time / ours time (> 1: ours is faster)."""
    ratios = [b / o for o, b in zip(times[ours], times[base])]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, med, q3 = statistics.quantiles(ratios, n=4)
    return med, q1, q3


def image_folder(path: str) -> Path:
    """An argparse type for `--data-dir`: a folder `vit fit` can train on (DIR/<class>/<image>), checked when the
    arguments are read, so that a wrong path is one usage line rather than a traceback minutes into a run."""
    from vit.data import ImageFolderDataModule

    try:  # the data module's own checks and messages: no such folder, no class folders, one class, no images
        ImageFolderDataModule(path, num_workers=0).setup("fit")
    except (FileNotFoundError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return Path(path)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None, **quick: Any) -> argparse.Namespace:
    """`parser.parse_args(argv)`, where `--quick` makes `quick` the defaults: an option given explicitly still wins
    (`--quick --rounds 5` runs 5 rounds)."""
    seen = argparse.ArgumentParser(add_help=False)
    seen.add_argument("--quick", action="store_true")
    if seen.parse_known_args(argv)[0].quick:
        parser.set_defaults(**quick)
    return parser.parse_args(argv)


def header() -> str:
    """Versions and threads, for the first line of every benchmark's output."""
    return f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, float32 CPU"
