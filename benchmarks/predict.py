"""Images per second of `vit predict`'s Python path (`vit.Predictor`) against a plain loop (PIL decode, timm's
eval transform, the model, in batches) on the same weights, in the same run.

    python benchmarks/predict.py                 # 1,000 JPEGs at 224 px
    python benchmarks/predict.py --amp           # also Predictor(amp=True): bfloat16 autocast against float32
    python benchmarks/predict.py --jpeg-size 4000 3000  # photo-sized JPEGs: decoding costs more than the model
    python benchmarks/predict.py --data-dir path/to/cifar10/train  # your own copy of the CIFAR-10 JPEGs
    python benchmarks/predict.py --quick --synthetic

The JPEGs are images of --data-dir (DIR/<class>/<image>, classes taken in turn) upsampled to 224 px: by default
CIFAR-10's from shared/data/cifar10-train (the JPEG copy) when that folder is there, otherwise synthetic ones.
The model is vit_tiny_patch16_224 (or --model) with random weights.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's vit, not an installed one
from common import image_folder, parse_args  # noqa: E402

import vit  # noqa: E402
from vit.images import IMAGE_EXTENSIONS  # noqa: E402
from vit.predict import Predictor  # noqa: E402

# The shared data sit beside the main checkout (../shared) or two levels up from a helper's worktree.
CIFAR_CANDIDATES = [ROOT.parent / "shared/data/cifar10-train", ROOT.parents[1] / "shared/data/cifar10-train"]
MODEL = "vit_tiny_patch16_224"
SIZE = 224
T = TypeVar("T")


def make_jpegs(folder: Path, count: int, source: Path | None, size: tuple[int, int] = (SIZE, SIZE)) -> list[Path]:
    """`count` JPEGs of `size` (width, height): the images of `source`/<class>/ resized (classes taken in turn), or
    smooth random pictures."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    classes = sorted(p for p in source.iterdir() if p.is_dir()) if source else []
    images = [sorted(p for p in c.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) for c in classes]
    images = [files for files in images if files]
    paths = []
    for i in range(count):
        if images:
            files = images[i % len(images)]
            image = Image.open(files[i // len(images) % len(files)]).convert("RGB")
        else:
            image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        paths.append(folder / f"{i:04d}.jpg")
        image.resize(size, Image.Resampling.BICUBIC).save(paths[-1], quality=90)
    return paths


def plain_loop(
    model: torch.nn.Module, transform: Callable[[Image.Image], torch.Tensor], paths: list[Path], batch_size: int
) -> list[int]:
    """What one would write by hand: decode, transform and classify, one batch after another."""
    top1 = []
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[start : start + batch_size]])
        with torch.inference_mode():
            _, classes = model(batch).softmax(-1).topk(5)
        top1 += classes[:, 0].tolist()
    return top1


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """(seconds that `fn()` took, what it returned)."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> None:
    """Build the images and the checkpoint, time both paths (best of --repeats), print images/s and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=None, help="Predictor's decoding workers (default: its own)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each path, alternating; the best counts")
    parser.add_argument("--quick", action="store_true", help="a handful of images, one run: a smoke test")
    parser.add_argument("--synthetic", action="store_true", help="synthetic JPEGs even if the CIFAR-10 copy is there")
    parser.add_argument("--data-dir", type=image_folder, help="DIR/<class>/<image> to take the images from")
    parser.add_argument("--model", default=MODEL, help="a 224-px model name (random weights)")
    parser.add_argument("--amp", action="store_true", help="also time Predictor(amp=True) (bfloat16 autocast)")
    parser.add_argument("--jpeg-size", type=int, nargs=2, default=(SIZE, SIZE), metavar=("W", "H"))
    args = parse_args(parser, argv, images=8, batch_size=4, repeats=1)
    source = args.data_dir or next((p for p in CIFAR_CANDIDATES if p.is_dir()), None)
    source = None if args.synthetic else source

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp) / "images", args.images, source, tuple(args.jpeg_size))
        torch.manual_seed(0)
        checkpoint = vit.save_safetensors(vit.create_model(args.model), Path(tmp) / f"{args.model}.safetensors")
        predictor = Predictor.from_checkpoint(checkpoint, batch_size=args.batch_size, num_workers=args.num_workers)
        amp_predictor = None
        if args.amp:
            amp_predictor = Predictor.from_checkpoint(
                checkpoint, batch_size=args.batch_size, num_workers=args.num_workers, amp=True
            )
        model, _ = vit.load_model(checkpoint)
        model.eval()
        transform = create_transform(**predictor.data_config, is_training=False)
        with torch.inference_mode():  # first-call costs (allocator, kernels) for neither side to pay
            model(torch.zeros(args.batch_size, 3, SIZE, SIZE))

        plain_s, predictor_s, amp_s = [], [], []
        for _ in range(args.repeats):
            seconds, plain_top1 = timed(lambda: plain_loop(model, transform, paths, args.batch_size))
            plain_s.append(seconds)
            seconds, results = timed(lambda: predictor.predict(Path(tmp) / "images", topk=5, progress=False))
            predictor_s.append(seconds)
            if amp_predictor:
                seconds, amp_results = timed(
                    lambda: amp_predictor.predict(Path(tmp) / "images", topk=5, progress=False)
                )
                amp_s.append(seconds)
        top1 = [r["predictions"][0]["index"] for r in results]
        agree = sum(a == b for a, b in zip(top1, plain_top1))
        amp_agree = sum(r["predictions"][0]["index"] == t for r, t in zip(amp_results, top1)) if amp_predictor else 0

    n = len(paths)
    width, height = args.jpeg_size
    kind = f"from {source}, resized" if source else "synthetic"
    print(f"{n} JPEGs of {width}x{height} px ({kind}), {args.model}, random weights")
    print(f"batch {args.batch_size}, torch threads {torch.get_num_threads()}, best of {args.repeats}")
    print(f"plain loop: {n / min(plain_s):8.1f} images/s")
    print(f"Predictor:  {n / min(predictor_s):8.1f} images/s")
    note = "a smoke run, not a measurement" if args.quick else "target >= 1.0"
    print(f"ratio Predictor / plain loop: {min(plain_s) / min(predictor_s):.2f} ({note})")
    print(f"top-1 agreement: {agree}/{n}")
    if args.amp:
        print(
            f"Predictor(amp=True): {n / min(amp_s):8.1f} images/s, {min(predictor_s) / min(amp_s):.2f} times float32's"
        )
        print(f"top-1 agreement with float32: {amp_agree}/{n}")


if __name__ == "__main__":
    main()
