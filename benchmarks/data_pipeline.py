"""Can the data keep up? Images/s that each data module's training loader delivers (default workers, default
augmentation) against images/s that the model consumes in a training step at the same batch size.

    python benchmarks/data_pipeline.py                               # a temporary ImageFolder of 32x32 JPEGs, digits
    python benchmarks/data_pipeline.py --data-dir /path/to/train     # a real ImageFolder (e.g. CIFAR-10 as JPEGs)
    python benchmarks/data_pipeline.py --data-dir DIR --in-memory    # the same decoded once into memory (RandAugment
                                                                     # then runs on the cached pixels)
    python benchmarks/data_pipeline.py --quick                       # seconds: keeps the script from rotting

Each setting takes its data module, model, batch size and threads from its config (configs/imagefolder.yaml:
RandAugment, random erasing, flip, random resized crop, decoded in `num_workers` processes; configs/digits.yaml:
tensors in memory, augmented a whole batch at a time, as `on_after_batch_transfer` does). "loader" is a pass over
`train_dataloader()` (the first, which starts the workers, is not timed); "model" is forward, loss, backward and
AdamW on one batch of that size. The two alternate, and the ratio loader/model is the median of per-round ratios:
above 1, the loader outruns the model it feeds (measured apart; in training they share the cores). In memory,
the line also gives the set-up time (decoding every image once) and what the cache holds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import image_folder, parse_args, ratio_spread
from loop_overhead import config_model, config_threads, plain_optimizer, random_image_folder, read_config, train_step

from vit.data import DigitsDataModule, ImageFolderDataModule, VisionDataModule
from vit.datasets import class_folders


def data_module(
    name: str, config: dict[str, Any], model: torch.nn.Module, data_dir: Path | None, in_memory: bool = False
) -> VisionDataModule:
    """The config's data module, set up for training with the model's input size, as `vit fit` sets it up."""
    cls = {"digits": DigitsDataModule, "imagefolder": ImageFolderDataModule}[name]
    kwargs = dict(config["data"].get("init_args") or {})
    if data_dir is not None:
        kwargs["train_dir"] = data_dir
    if in_memory and name == "imagefolder":
        kwargs["in_memory"] = True  # the config's RandAugment then runs on the cached pixels, in the workers
    cfg = model.pretrained_cfg  # what ViTClassifier hands the data module at setup (crop_pct stays the module's)
    own = {"input_size": (model.cfg.in_chans, *model.cfg.img_hw), "mean": cfg["mean"], "std": cfg["std"]}
    dm = cls(**kwargs, preprocessing={**own, "interpolation": cfg.get("interpolation", "bicubic")})
    dm.setup("fit")
    return dm


def loader_rate(dm: VisionDataModule, loader: Any, batches: int) -> float:
    """Images/s over `batches` batches of a fresh pass (workers persist between passes)."""
    images, start = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        x = dm.batch_augment(batch[0]) if dm.in_memory else batch[0]  # in memory: augmented after transfer
        images += len(x)
        if i + 1 >= batches:
            break
    return images / (time.perf_counter() - start)


def model_rate(model: torch.nn.Module, optimizer: Any, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Images/s of `steps` training steps on one batch."""
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, x, y, 0.1)
    return steps * len(x) / (time.perf_counter() - start)


def compare(
    name: str, data_dir: Path | None, label: str, rounds: int, batches: int, batch_size: int | None, in_memory: bool
) -> str:
    """Alternate a loader pass and as many model steps; one line with both rates and their ratio."""
    config = read_config(name)
    if batch_size:
        config["data"].setdefault("init_args", {})["batch_size"] = batch_size
    torch.set_num_threads(config_threads(config))
    classes = len(class_folders(data_dir)) if data_dir else 10
    model = config_model(config, classes).train()
    start = time.perf_counter()
    dm = data_module(name, config, model, data_dir, in_memory)
    setup_s = time.perf_counter() - start
    loader = dm.train_dataloader()
    batches = min(batches, len(loader))
    b = dm.hparams.batch_size
    x = torch.randn(b, *model.pretrained_cfg["input_size"])
    y = torch.randint(0, classes, (b,))
    optimizer = plain_optimizer(model, config)
    loader_rate(dm, loader, 1)  # starts the workers
    model_rate(model, optimizer, x, y, 2)
    feed, eat = [], []
    for r in range(rounds):
        for side in ("loader", "model") if r % 2 == 0 else ("model", "loader"):
            if side == "loader":
                feed.append(loader_rate(dm, loader, batches))
            else:
                eat.append(model_rate(model, optimizer, x, y, batches))
    ratios = [f / e for f, e in zip(feed, eat)]
    cached = ""
    if dm.in_memory:
        x = dm.datasets["train"].cached[0]
        cached = f", set up in {setup_s:.1f} s, cache {tuple(x.shape)} {x.dtype} {x.nbytes / 1e6:.0f} MB"
    return (
        f"{name:11s} batch {b:3d}, {dm.num_workers} worker(s), {torch.get_num_threads()} thread(s), {label}{cached}\n"
        f"{'':11s} loader {statistics.median(feed):8.1f} img/s   model {statistics.median(eat):7.1f} img/s   "
        f"loader/model {ratio_spread(ratios, digits=2)}"
    )


def main(argv: list[str] | None = None) -> int:
    """Print loader/model images/s for the ImageFolder and digits data modules."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=["imagefolder", "digits"], default=["imagefolder", "digits"])
    parser.add_argument(
        "--data-dir", type=image_folder, help="ImageFolder setting: DIR/<class>/<image> (default: random)"
    )
    parser.add_argument("--images", type=int, default=2000, help="random ImageFolder: images (10 classes)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=12, help="batches per loader pass (and model steps)")
    parser.add_argument("--in-memory", action="store_true", help="ImageFolder setting: in_memory=True")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 1 round of 2 batches of 8")
    args = parse_args(parser, argv, rounds=1, batches=2, images=60)
    batch_size = 8 if args.quick else None
    print(f"torch {torch.__version__}, float32 CPU, {len(os.sched_getaffinity(0))} cores")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings:
            data_dir, label = None, "sklearn digits in memory"
            if name == "imagefolder":
                data_dir = args.data_dir or random_image_folder(Path(tmp), 10, max(2, args.images // 10))
                label = str(args.data_dir) if args.data_dir else f"{args.images} random 32x32 JPEGs"
            print(compare(name, data_dir, label, args.rounds, args.batches, batch_size, args.in_memory), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
