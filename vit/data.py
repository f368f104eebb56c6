"""LightningDataModules: scikit-learn's digits, CIFAR-10/100 and ImageNet-style folders, all importable from here.

Every module decodes images as the loader asks for them (or once, up front, with `in_memory`), splits them, and
transforms them with timm's `create_transform` from the model's data config (input size, mean, std, interpolation,
crop), which the trainer's LightningModule supplies at `setup`. Training images are augmented; validation and test
images never are. Small sets (digits) are kept in memory as tensors and augmented a whole batch at a time. An
image that cannot be read is dropped from its batch, and one warning counts them at the end of each stage. What they
share is `vit.datamodule.VisionDataModule`; the CIFAR modules, with their batch-file readers, are in `vit.cifar`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from vit.cifar import CIFAR10DataModule, CIFAR100DataModule
from vit.datamodule import VisionDataModule
from vit.datasets import ArrayImages, FileImages, carve, class_folders
from vit.images import IMAGE_EXTENSIONS, images_under

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "VisionDataModule",
]


class DigitsDataModule(VisionDataModule):
    """scikit-learn's bundled 8x8 digits (1,797 images), offline and held in memory as tensors.

    The test split is fixed: `train_test_split(test_size=0.2, random_state=0, stratify=y)`, 360 images;
    validation is carved from the other 80%. Augmentation is a mild random resized crop of whole batches;
    digits are not mirror-symmetric, so there is no flip by default.
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        preprocessing: dict[str, Any] | None = None,
        re_prob: float = 0.0,
        hflip: float = 0.0,
        scale: tuple[float, float] = (0.7, 1.0),
        degrees: float = 0.0,
    ):
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            val_fraction=val_fraction,
            split_seed=split_seed,
            # The whole 8x8 digit is the object: no border to crop away at evaluation.
            preprocessing={"crop_pct": 1.0, **(preprocessing or {})},
            auto_augment=None,
            re_prob=re_prob,
            hflip=hflip,
            scale=scale,
            in_memory=True,
            degrees=degrees,
        )
        self.class_names = [str(d) for d in range(10)]

    def _splits(self, needed: tuple[str, ...]) -> dict[str, tuple[Any, list[int]]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255 grey levels
        source = ArrayImages(images, digits.target, "digits")
        everything = np.arange(len(images))
        rest, test = train_test_split(everything, test_size=0.2, random_state=0, stratify=digits.target)
        train, val = carve(source.targets, rest, self.hparams.val_fraction, self.hparams.split_seed)
        splits = {"train": train, "val": val, "test": sorted(test.tolist())}
        return {split: (source, splits[split]) for split in needed}


class ImageFolderDataModule(VisionDataModule):
    """ImageNet-style folders: `train_dir/<class>/<image>`; optional `val_dir` and `test_dir` in the same
    layout. Without `val_dir`, validation is carved from `train_dir`. Class names are the training folder's
    sub-folder names, sorted; the other folders are mapped by name."""

    def __init__(
        self,
        train_dir: str | Path,
        val_dir: str | Path | None = None,
        test_dir: str | Path | None = None,
        **kwargs: Any,  # VisionDataModule's: batch size, workers, split, preprocessing, augmentation
    ):
        super().__init__(**kwargs)
        self.train_dir = Path(train_dir)
        self.class_names = class_folders(self.train_dir)
        if not self.class_names:
            raise ValueError(f"{self.train_dir}: no class folders (expected {self.train_dir}/<class>/<image>)")
        if len(self.class_names) == 1:
            raise ValueError(
                f"{self.train_dir}: one class folder ({self.class_names[0]}); a classifier needs two or more"
            )

    def _splits(self, needed: tuple[str, ...]) -> dict[str, tuple[Any, list[int]]]:
        splits: dict[str, tuple[Any, list[int]]] = {}
        val_dir, test_dir = self.hparams.val_dir, self.hparams.test_dir
        if "train" in needed or ("val" in needed and val_dir is None):
            train = self._scan(self.train_dir)
            # a class without training images would be a head output that nothing trains
            empty = sorted(set(self.class_names) - {self.class_names[t] for t in train.targets})
            if empty:
                raise ValueError(f"{self.train_dir}: no images in the class folder(s) {', '.join(empty[:5])}")
            kept, val = range(len(train.targets)), None
            if val_dir is None:
                kept, val = carve(train.targets, kept, self.hparams.val_fraction, self.hparams.split_seed)
            splits["train"] = (train, list(kept))
            if val is not None:
                splits["val"] = (train, val)
        if "val" in needed and val_dir is not None:
            source = self._scan(Path(val_dir))
            splits["val"] = (source, list(range(len(source.targets))))
        if "test" in needed:
            if test_dir is None:
                raise ValueError(
                    "there is no test split without a test folder: give test_dir (on the command line, "
                    "--data.test_dir path/to/test)"
                )
            source = self._scan(Path(test_dir))
            splits["test"] = (source, list(range(len(source.targets))))
        return {k: v for k, v in splits.items() if k in needed}

    def _scan(self, folder: Path) -> FileImages:
        """The images under `folder/<class>/`, labelled by the training folder's class list."""
        found = class_folders(folder)
        unknown = sorted(set(found) - set(self.class_names))
        if unknown:
            raise ValueError(f"{folder}: class folders not in {self.train_dir}: {', '.join(unknown[:5])}")
        index = {name: i for i, name in enumerate(self.class_names)}
        # the files `vit predict` finds: its extensions (torchvision's list lacks .gif, .jfif, .tga ...) and its walk,
        # which skips a symbolic link back to a folder above (torchvision's follows it some 40 times: each image 40
        # times over); in torchvision's order, folder by folder, so that splits stay as they were
        samples = [
            (str(path), index[name])
            for name in found
            for path in sorted(images_under(folder / name), key=lambda p: (str(p.parent), p.name))
        ]
        if not samples:
            extensions = sorted(IMAGE_EXTENSIONS)
            raise ValueError(f"{folder}: no images found (expected <class>/<image> with {', '.join(extensions)})")
        return FileImages(samples)
