"""Small data sets that the tests write for themselves: ImageNet-style trees and CIFAR-format folders."""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_image_folder(
    root: Path, classes: Sequence[str] = ("cat", "dog", "fox"), per_class: int = 6, size: int = 16, seed: int = 0
) -> Path:
    """root/<class>/<i>.png; each class has its own dominant colour channel, so it can be learned quickly."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size, 3))
            pixels[..., c % 3] += 150 + 40 * (c // 3)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def write_broken_images(folder: Path) -> list[Path]:
    """A file that is no image at all and a JPEG cut short; both carry image extensions."""
    folder.mkdir(parents=True, exist_ok=True)
    garbage = folder / "garbage.jpg"
    garbage.write_bytes(b"this is not an image")
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buffer, format="JPEG")
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return [garbage, truncated]


def write_cifar10(
    root: Path, per_batch: int = 8, seed: int = 0, protocol: int = pickle.DEFAULT_PROTOCOL
) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    """torchvision's on-disk CIFAR-10 layout (root/cifar-10-batches-py/, pickled dicts of numpy arrays), pickled
    with `protocol`. Returns (train images NHWC, train labels, test images, test labels)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(name: str) -> tuple[np.ndarray, list[int]]:
        data = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)  # rows are R, G, B planes
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name.encode(), "data": data, "labels": labels}, f, protocol=protocol)
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels

    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    test_images, test_labels = batch("test_batch")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_NAMES, "num_cases_per_batch": per_batch}, f, protocol=protocol)
    train_images = np.concatenate([images for images, _ in train])
    return train_images, [y for _, labels in train for y in labels], test_images, test_labels


def write_cifar100(root: Path, per_split: int = 200, seed: int = 0) -> list[str]:
    """torchvision's on-disk CIFAR-100 layout (root/cifar-100-python/: train, test, meta, with fine and coarse
    labels). Returns the 100 fine class names."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    names = [f"class_{i:02d}" for i in range(100)]
    for split in ("train", "test"):
        fine = rng.integers(0, 100, per_split).tolist()
        data = rng.integers(0, 256, (per_split, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": fine, "coarse_labels": [y // 5 for y in fine]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": [f"group_{i}" for i in range(20)]}, f)
    return names
