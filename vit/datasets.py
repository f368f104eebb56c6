"""Where images come from (files, in-memory arrays) and the Dataset that decodes and transforms them, turning an
unreadable image into a `Skipped` marker that `collate_skipping` drops; and what the data modules build from: the
whole-batch augmentations (random resized crop, random erasing), per-image colour ops on 8-bit tensors
(`EachImage`), their normalisation (`EightBitToModelInput`), the validation split (`carve`) and class folders."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import transforms

from vit.images import describe_error, read_image

# What PIL raises for a missing, truncated or undecodable file.
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class FileImages:
    """Labelled image files, decoded on demand."""

    def __init__(self, samples: Sequence[tuple[str, int]]):
        self.paths = [p for p, _ in samples]
        self.targets = [t for _, t in samples]

    def load(self, i: int, mode: str, min_size: int | None = None) -> Image.Image:
        """Image `i` in `mode` ('RGB' or 'L'), read as `vit predict` reads it (`vit.images.read_image`)."""
        return read_image(self.paths[i], mode, min_size)

    def name(self, i: int) -> str:
        """Image `i` as messages name it: its path."""
        return self.paths[i]


class ArrayImages:
    """Labelled images held in memory as a uint8 array (N, H, W) or (N, H, W, C)."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], label: str):
        self.images, self.targets, self.label = images, [int(t) for t in targets], label

    def load(self, i: int, mode: str, min_size: int | None = None) -> Image.Image:
        """Image `i` in `mode`; `min_size` (a JPEG's decoding scale) does not apply to arrays."""
        return Image.fromarray(self.images[i]).convert(mode)

    def name(self, i: int) -> str:
        """Image `i` as messages name it: 'label[i]'."""
        return f"{self.label}[{i}]"


class Skipped(tuple):
    """A sample that could not be read: (name, reason). The collate function drops it."""


class EightBitToModelInput:
    """uint8 images (..., C, H, W) to the model's float input, computed as timm's evaluation transform computes it
    from a PIL image (to float, / 255, then `Normalize(mean, std)`), bit for bit."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.normalize = transforms.Normalize(torch.tensor(mean), torch.tensor(std), inplace=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x.float().div(255))


class EachImage:
    """A PIL transform (timm's RandAugment, colour jitter) applied image by image to uint8 images: a batch
    (N, C, H, W) or one (C, H, W), one or three channels."""

    def __init__(self, transform: Callable[[Image.Image], Image.Image]):
        self.transform = transform

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return self(x[None])[0]
        out = torch.empty_like(x)
        for i, image in enumerate(x.permute(0, 2, 3, 1).numpy()):  # (H, W, C)
            changed = self.transform(Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image))
            out[i] = torch.from_numpy(np.atleast_3d(np.array(changed, dtype=np.uint8))).permute(2, 0, 1)
        return out


class ImageDataset(Dataset):
    """A split of an image source: decode, convert to the model's channels, transform.

    With `cache=True` every item is transformed once, up front (by `workers` loader processes), and the split is
    held as one tensor; unreadable items are then left out and listed in `skipped`. `finish` turns what the cache
    holds into what the loader yields, item or batch: the cache can then hold 8-bit pixels, a quarter of the
    memory of float32, and `finish` normalise them (`EightBitToModelInput`).
    """

    def __init__(
        self,
        source: Any,
        indices: Sequence[int],
        transform: Any,
        mode: str,
        cache: bool = False,
        workers: int = 0,
        finish: Callable[[torch.Tensor], torch.Tensor] | None = None,
        min_size: int | None = None,
    ):
        self.source, self.indices, self.transform, self.mode = source, list(indices), transform, mode
        self.min_size = min_size  # JPEGs are decoded at reduced scale down to this side (`vit.images.decode_size`)
        self.finish = finish  # not a lambda: datasets travel to spawned loader workers by pickle
        self.cached: tuple[torch.Tensor, torch.Tensor] | None = None
        self.skipped: list[Skipped] = []
        if cache:
            self.cached = self._decode_all(workers)

    def _decode_all(self, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
        workers = workers if len(self.indices) > 4096 else 0  # starting processes costs more than small sets
        loader = DataLoader(self, batch_size=256, num_workers=workers, collate_fn=collate_skipping)
        xs, ys = [], [torch.empty(0, dtype=torch.long)]
        for x, y, *skipped in loader:
            xs.extend([x] if len(x) else [])
            ys.append(y)
            self.skipped.extend(skipped[0] if skipped else [])
        return (torch.cat(xs) if xs else torch.empty(0)), torch.cat(ys)

    def __len__(self) -> int:
        return len(self.indices) if self.cached is None else len(self.cached[1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | Skipped:
        if self.cached is not None:
            return self._finished(self.cached[0][i]), self.cached[1][i]
        return self._read(i)

    def __getitems__(self, indices: list[int]) -> list[Any] | tuple[torch.Tensor, torch.Tensor]:
        """A whole batch; from the cache as one indexing op (the DataLoader calls this instead of per item)."""
        if self.cached is None:
            return [self._read(i) for i in indices]
        index = torch.as_tensor(indices)
        return self._finished(self.cached[0][index]), self.cached[1][index]

    def _finished(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.finish is None else self.finish(x)

    def _read(self, i: int) -> tuple[torch.Tensor, int] | Skipped:
        j = self.indices[i]
        try:
            image = self.source.load(j, self.mode, self.min_size)
            return self.transform(image), self.source.targets[j]
        except READ_ERRORS as e:
            return Skipped((self.source.name(j), describe_error(e)))


def collate_skipping(items: list[Any]) -> tuple:
    """`default_collate` over the readable items; unreadable ones ride along as a third element."""
    if isinstance(items, tuple):  # a batch from a cached split, already stacked
        return items
    good = [it for it in items if not isinstance(it, Skipped)]
    skipped = [it for it in items if isinstance(it, Skipped)]
    x, y = default_collate(good) if good else (torch.empty(0), torch.empty(0, dtype=torch.long))
    return (x, y, skipped) if skipped else (x, y)


def batch_random_resized_crop(
    x: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3), degrees: float = 0.0
) -> torch.Tensor:
    """timm's random resized crop for a whole batch (B, C, H, W) at once: each image gets its own crop (area
    fraction in `scale`, aspect ratio in `ratio`), turned by up to `degrees` either way, resampled bilinearly to
    the same size."""
    b = len(x)
    area = torch.empty(b, device=x.device).uniform_(*scale)
    log_ratio = torch.empty(b, device=x.device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # crop width and height as fractions of the image
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, device=x.device) * 2 - 1) * (1 - w)  # crop centre in [-1, 1] coordinates
    cy = (torch.rand(b, device=x.device) * 2 - 1) * (1 - h)
    # no draw at all without rotation, so that runs without it keep their random stream
    angle = torch.empty(b, device=x.device).uniform_(-degrees, degrees).deg2rad() if degrees else torch.zeros_like(w)
    cos, sin = angle.cos(), angle.sin()
    # output (u, v) -> input: rotation @ diag(w, h) @ (u, v) + centre
    theta = torch.stack([torch.stack([cos * w, -sin * h, cx], 1), torch.stack([sin * w, cos * h, cy], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)  # (B, 2, 3) -> sampling grid
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def batch_random_erasing(
    x: torch.Tensor,
    probability: float,
    area: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
    attempts: int = 10,
) -> torch.Tensor:
    """timm's `RandomErasing(probability, mode='const')` for a whole batch (B, C, H, W) at once: with
    `probability`, an image gets one rectangle of zeros covering a fraction `area` of it, aspect ratio in `ratio`,
    drawn up to `attempts` times until it fits. timm erases image by image: a few kernels each on a GPU."""
    b, _, height, width = x.shape
    on = dict(device=x.device)
    target = torch.empty(b, attempts, **on).uniform_(*area) * (height * width)
    aspect = torch.empty(b, attempts, **on).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    h, w = (target * aspect).sqrt().round(), (target / aspect).sqrt().round()  # (B, attempts), as timm rounds
    fits = (h < height) & (w < width)
    first = fits.int().argmax(1, keepdim=True)  # the first attempt that fits
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    erase = (torch.rand(b, **on) < probability) & fits.any(1)
    top = (torch.rand(b, **on) * (height - h + 1)).floor()[:, None, None]
    left = (torch.rand(b, **on) * (width - w + 1)).floor()[:, None, None]
    rows, cols = torch.arange(height, **on)[None, :, None], torch.arange(width, **on)[None, None, :]
    inside = (rows >= top) & (rows < top + h[:, None, None]) & (cols >= left) & (cols < left + w[:, None, None])
    return x.masked_fill((inside & erase[:, None, None])[:, None], 0.0)


def carve(targets: Sequence[int], indices: Sequence[int], fraction: float, seed: int) -> tuple[list, list]:
    """Split `indices` into (kept, carved) with `fraction` carved out, stratified by class where possible."""
    indices = np.asarray(indices)
    labels = np.asarray(targets)[indices]
    n_carved = round(len(indices) * fraction)
    if n_carved == 0 or n_carved == len(indices):
        empty = "validation" if n_carved == 0 else "training"
        raise ValueError(
            f"val_fraction={fraction} of {len(indices)} images leaves no {empty} images; "
            f"give a fraction between {1 / len(indices):.2g} and {1 - 1 / len(indices):.2g}"
        )
    counts = np.unique(labels, return_counts=True)[1]
    # sklearn stratifies only when every class has 2+ images and each side can hold one of every class
    can_stratify = counts.min() >= 2 and min(n_carved, len(indices) - n_carved) >= len(counts)
    stratify = labels if can_stratify else None
    kept, carved = train_test_split(indices, test_size=n_carved, random_state=seed, stratify=stratify)
    return sorted(kept.tolist()), sorted(carved.tolist())


def class_folders(folder: Path) -> list[str]:
    """The names of the sub-folders of `folder` (hidden ones aside), sorted: its classes."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
