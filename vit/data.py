"""LightningDataModules: scikit-learn's digits, CIFAR-10/100 and ImageNet-style folders.

Every module decodes images lazily, splits them, and transforms them with timm's `create_transform` from the
model's data config (input size, mean, std, interpolation, crop), which the trainer's LightningModule supplies
at `setup`. Training images are augmented; validation and test images never are. Small sets (digits) are kept
in memory as tensors and augmented a whole batch at a time. An image that cannot be read is dropped from its
batch, and one warning counts them at the end of each stage.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from sklearn.model_selection import train_test_split
from timm.data import auto_augment, create_transform, resolve_data_config
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets.folder import make_dataset

from vit.datasets import (
    ArrayImages,
    EachImage,
    EightBitToModelInput,
    FileImages,
    ImageDataset,
    batch_random_erasing,
    batch_random_resized_crop,
    carve,
    cifar_entry,
    class_folders,
    collate_skipping,
    read_cifar_batch,
    read_cifar_file,
)
from vit.lightning_notes import silence_lightning_notes
from vit.predict import IMAGE_EXTENSIONS, decode_size

silence_lightning_notes()  # before any Trainer, for notebooks and scripts as for `vit fit` (vit.module too)

DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


def default_num_workers() -> int:
    """Loader processes: all cores but one, which the training loop keeps (at most 8)."""
    return min(8, max(1, len(os.sched_getaffinity(0)) - 1))


def plain_data_config(config: dict[str, Any]) -> dict[str, Any]:
    """timm's data config with lists instead of tuples and only the keys `create_transform` needs."""
    out = {k: config[k] for k in DATA_CONFIG_KEYS if k in config}
    out["input_size"] = [int(v) for v in out["input_size"]]
    channels = out["input_size"][0]
    for key in ("mean", "std"):
        values = [float(v) for v in out[key]]
        # timm's defaults are RGB; a grey model without its own statistics gets their average
        out[key] = values if len(values) == channels else [sum(values) / len(values)] * channels
    out["crop_pct"] = float(out["crop_pct"])
    return out


# ------------------------------------------------------------------------------------------ data modules
def _posterize(image: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize op, except that keeping 0 bits gives the black image it stands for (as in TensorFlow's
    RandAugment and older Pillow) rather than the ValueError that Pillow now raises."""
    if bits_to_keep <= 0:
        return image.point(lambda _: 0)
    return auto_augment.posterize(image, bits_to_keep, **kwargs)


def with_black_zero_bit_posterize(transform: Any) -> Any:
    """`transform` with every timm posterize op in it (RandAugment, AutoAugment) running `_posterize` above.

    timm's increasing-severity RandAugment ('inc1', our default) keeps 0 bits whenever an op's noisy magnitude
    reaches 10: about 1 image in 700, on which Pillow raised, and the loader would have counted it unreadable.
    """
    for step in getattr(transform, "transforms", []):
        policy = [op for sub_policy in getattr(step, "policy", []) for op in sub_policy]  # AutoAugment
        for op in [*getattr(step, "ops", []), *policy]:  # RandAugment's ops
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize
    return transform


class VisionDataModule(L.LightningDataModule):
    """What every data module shares: preprocessing from the model, augmentation, loaders, skip counting.

    Subclasses set `class_names` and implement `_splits(needed)`, returning {split: (source, indices)}.

    Args:
        batch_size: images per batch.
        num_workers: loader processes; None: all cores but one.
        val_fraction: share of the training images carved out for validation, when there is no other.
        split_seed: seed of that split (independent of the training seed, so runs compare).
        preprocessing: timm data-config keys (`input_size`, `mean`, `std`, `interpolation`, `crop_pct`,
            `crop_mode`) that override the model's own.
        auto_augment: timm's RandAugment string, e.g. 'rand-m9-mstd0.5-inc1'; None: off.
        re_prob: random-erasing probability.
        hflip: horizontal-flip probability.
        scale: area range of the random resized crop.
        color_jitter: colour-jitter strength (ignored by timm while RandAugment is on); None: off.
        in_memory: decode and preprocess every image once and keep the splits as uint8 tensors (normalised a
            batch at a time). Training images then get RandAugment (or colour jitter) image by image in the loader
            workers, from the cached pixels, and the random resized crop, flip and random erasing a whole batch at
            a time on the device. For sets that fit in memory (CIFAR-size images: 150 MB for CIFAR-10's 50,000).
        degrees: random rotation of up to this many degrees either way, in the in-memory batch augmentation.
    """

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        preprocessing: dict[str, Any] | None = None,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        hflip: float = 0.5,
        scale: tuple[float, float] = (0.08, 1.0),
        color_jitter: float | None = None,
        in_memory: bool = False,
        degrees: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.in_memory = in_memory
        # In memory a batch is a slice of tensors: worker processes would only add start-up time, unless they have
        # per-image colour ops (RandAugment) to run.
        self.per_image_colour = bool(auto_augment or color_jitter)  # subclasses' hparams can lack these keys
        idle = in_memory and not self.per_image_colour
        self.num_workers = (0 if idle else default_num_workers()) if num_workers is None else num_workers
        self.preprocessing = dict(preprocessing or {})  # hparams keeps what the user passed
        self.class_names: list[str] | None = None
        self.data_config: dict[str, Any] | None = None
        self.datasets: dict[str, ImageDataset] = {}
        self.skipped: dict[str, str] = {}

    @property
    def num_classes(self) -> int:
        """The number of classes (known once the data set was found, at the latest after `setup`)."""
        if self.class_names is None:
            raise RuntimeError(f"{type(self).__name__}: class names are known after setup()")
        return len(self.class_names)

    def _splits(self, needed: tuple[str, ...]) -> dict[str, tuple[Any, list[int]]]:
        """{split: (image source, indices)} for the splits named in `needed` ('train', 'val', 'test')."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        """Resolve the preprocessing, then build the splits `stage` needs."""
        silence_lightning_notes()  # again: a warnings.catch_warnings around the import would have undone it
        model = getattr(self.trainer.lightning_module, "model", None) if self.trainer else None
        # Without a model (the module used on its own) timm's ImageNet defaults fill what is not given.
        base = getattr(model, "pretrained_cfg", None) or {"input_size": (3, 224, 224)}
        config = resolve_data_config(args=self.preprocessing, pretrained_cfg=base)
        self.data_config = plain_data_config(config)
        channels = self.data_config["input_size"][0]
        if channels not in (1, 3):
            raise ValueError(f"images are read as grey (1 channel) or RGB (3 channels), not {channels} channels")
        mode = "L" if channels == 1 else "RGB"
        for split, (source, indices) in self._splits(STAGE_SPLITS[stage]).items():
            if self.in_memory:  # 8-bit pixels; as the loader hands a batch out: per-image colour ops, normalise
                transform, finish = self.eval_transform(eight_bit=True), self.eight_bit_to_model_input()
                colour = self.colour_transform() if split == "train" and self.per_image_colour else None
                finish = transforms.Compose([EachImage(colour), finish]) if colour else finish
            else:
                transform, finish = self.train_transform() if split == "train" else self.eval_transform(), None
            # Decoding is the slow part of caching: all the cores share it, whatever the training loader uses.
            workers = default_num_workers() + 1
            # a large JPEG decodes at reduced scale, as `vit predict` decodes it: evaluation then sees its pixels
            crop_scale = self.hparams.scale[0] if split == "train" and not self.in_memory else None
            min_size = decode_size(self.data_config, crop_scale)
            dataset = ImageDataset(source, indices, transform, mode, self.in_memory, workers, finish, min_size)
            self.skipped.update(dict(dataset.skipped))
            self.datasets[split] = dataset

    def train_transform(self, separate: bool = False) -> Any:
        """timm's training pipeline: random resized crop, flip, RandAugment, normalise, random erasing.
        `separate`: timm's three stages apart, (crop and flip, colour, tensor and erasing)."""
        c, h = self.data_config, self.hparams
        transform = create_transform(
            c["input_size"],
            is_training=True,
            scale=tuple(h.scale),
            hflip=h.hflip,
            color_jitter=h.color_jitter,
            auto_augment=h.auto_augment,
            re_prob=h.re_prob,
            interpolation=c["interpolation"],
            mean=c["mean"],
            std=c["std"],
            separate=separate,
        )
        if separate:
            return tuple(map(with_black_zero_bit_posterize, transform))
        return with_black_zero_bit_posterize(transform)

    def colour_transform(self) -> Any | None:
        """The per-image colour stage of `train_transform` (RandAugment, or colour jitter without it) on PIL
        images; None when there is none."""
        colour = self.train_transform(separate=True)[1]
        return colour if colour.transforms else None

    def eval_transform(self, eight_bit: bool = False) -> Any:
        """timm's evaluation pipeline: resize, centre crop (crop_pct), normalise; no randomness. `eight_bit`: stop
        before normalising, at uint8 (C, H, W) pixels (timm's `use_prefetcher` form)."""
        return create_transform(**self.data_config, use_prefetcher=eight_bit)

    def eight_bit_to_model_input(self) -> EightBitToModelInput:
        """What turns `eval_transform(eight_bit=True)`'s pixels into `eval_transform()`'s tensors, bit for bit."""
        return EightBitToModelInput(self.data_config["mean"], self.data_config["std"])

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"{type(self).__name__} has no {split} split")
        dataset = self.datasets[split]
        workers = self.num_workers if train or not self.in_memory else 0  # in memory, evaluation is slicing alone
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=train,
            drop_last=train and len(dataset) > self.hparams.batch_size,  # even batches for Mixup/CutMix
            num_workers=workers,
            # training workers start afresh each epoch, seeded from the global torch RNG, which checkpoints carry:
            # persistent ones would carry their RNGs on from epoch to epoch, out of a resumed run's reach
            persistent_workers=workers > 0 and not train,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate_skipping,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test split, unlabelled use: `trainer.predict(module, datamodule=...)`."""
        return self._loader("test")

    # Lightning's model summary passes the model's example input, a bare tensor, through these hooks too: only a
    # batch from our loaders, (images, labels[, skipped]), is unpacked and augmented (the summary draws no RNG)
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, (tuple, list)) and len(batch) == 3:  # unreadable images: remember them, pass the rest
            self.skipped.update(dict(batch[2]))
            batch = batch[:2]
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        loader_batch = isinstance(batch, (tuple, list))
        if loader_batch and self.in_memory and self.trainer is not None and self.trainer.training:
            batch = (self.batch_augment(batch[0]), *batch[1:])
        return batch

    def batch_augment(self, x: torch.Tensor) -> torch.Tensor:
        """Training augmentation of a whole batch (B, C, H, W): random resized crop, flip, random erasing."""
        h = self.hparams
        x = batch_random_resized_crop(x, tuple(h.scale), degrees=h.degrees)
        if h.hflip > 0:
            flip = torch.rand(len(x), device=x.device) < h.hflip
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if h.re_prob > 0:
            x = batch_random_erasing(x, h.re_prob)
        return x

    def teardown(self, stage: str) -> None:
        if self.skipped:
            named = [f"{name} ({reason})" for name, reason in list(self.skipped.items())[:3]]
            more = f"; and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            warnings.warn(
                f"skipped {len(self.skipped)} unreadable image(s): {'; '.join(named)}{more}", UserWarning, stacklevel=1
            )
            self.skipped.clear()


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
        # the extensions `vit predict` finds (torchvision's list lacks .gif, .jfif, .tga ...: silently left out)
        extensions = tuple(sorted(IMAGE_EXTENSIONS))
        samples = make_dataset(str(folder), index, extensions=extensions, allow_empty=True)
        if not samples:
            raise ValueError(f"{folder}: no images found (expected <class>/<image> with {', '.join(extensions)})")
        return FileImages(samples)


class CIFAR10DataModule(VisionDataModule):
    """CIFAR-10 through torchvision's download and on-disk layout (`data_dir/cifar-10-batches-py/`); the
    official test set is the test split and validation is carved from the 50,000 training images."""

    dataset_name = "CIFAR10"

    def __init__(
        self,
        data_dir: str | Path = "data",
        download: bool = True,
        preprocessing: dict[str, Any] | None = None,
        scale: tuple[float, float] = (0.35, 1.0),
        **kwargs: Any,  # VisionDataModule's: batch size, workers, split, augmentation
    ):
        # CIFAR images are the whole object at the model's size: no centre crop at evaluation.
        super().__init__(preprocessing={"crop_pct": 1.0, **(preprocessing or {})}, scale=scale, **kwargs)
        import torchvision.datasets

        self.spec = getattr(torchvision.datasets, self.dataset_name)  # URLs, checksums, file names
        self.root = Path(data_dir) / self.spec.base_folder

    def prepare_data(self) -> None:
        if self.hparams.download and self._missing():
            self._refuse_the_folder_itself()  # rather than download a second copy inside the first
            from torchvision.datasets.utils import download_and_extract_archive

            spec, data_dir = self.spec, Path(self.hparams.data_dir)
            made = not data_dir.exists()
            try:
                download_and_extract_archive(spec.url, str(data_dir), filename=spec.filename, md5=spec.tgz_md5)
            except OSError as e:  # URLError when offline, or a folder we cannot write
                if made and data_dir.is_dir() and not any(data_dir.iterdir()):
                    data_dir.rmdir()  # the download made it and put nothing in it
                raise FileNotFoundError(
                    f"{self.root}: no {self.dataset_name} copy, and downloading {spec.url} failed ({e}); "
                    f"pass --data.data_dir a folder that holds {spec.base_folder}/"
                ) from e

    def _files(self) -> list[tuple[str, str]]:
        return [*self.spec.train_list, *self.spec.test_list, (self.spec.meta["filename"], "")]

    def _missing(self) -> list[str]:
        return [name for name, _ in self._files() if not (self.root / name).is_file()]

    def _refuse_the_folder_itself(self) -> None:
        """data_dir one level too deep (the batch files themselves) gets its parent named, not a download."""
        data_dir = Path(self.hparams.data_dir)
        if any((data_dir / name).is_file() for name, _ in self._files()):
            raise FileNotFoundError(
                f"{data_dir} holds the {self.dataset_name} files itself: --data.data_dir is the folder above "
                f"{self.spec.base_folder}/, here {data_dir.resolve().parent}"
            )

    def _read(self, names: list[list[str]]) -> ArrayImages:
        images, targets = [], []
        for name, _md5 in names:
            # torchvision's rule: CIFAR-10 has 'labels', CIFAR-100 'fine_labels' (and 'coarse_labels')
            data, labels = read_cifar_batch(self.root / name, ["labels", "fine_labels"], len(self.class_names))
            images.append(data)
            targets.extend(labels)
        return ArrayImages(np.concatenate(images), targets, f"{self.dataset_name}")

    def setup(self, stage: str) -> None:
        missing = self._missing()
        if missing:
            self._refuse_the_folder_itself()
            hint = "" if self.hparams.download else "; pass --data.download true to fetch it"
            some = "an incomplete" if len(missing) < len(self._files()) else "no"
            more = " ..." if len(missing) > 3 else ""
            raise FileNotFoundError(
                f"{self.root}: {some} {self.dataset_name} copy (missing {', '.join(missing[:3])}{more}){hint}"
            )
        meta_file = self.root / self.spec.meta["filename"]
        names = cifar_entry(read_cifar_file(meta_file), [self.spec.meta["key"]], meta_file)
        self.class_names = [str(n) for n in names]
        super().setup(stage)

    def _splits(self, needed: tuple[str, ...]) -> dict[str, tuple[Any, list[int]]]:
        splits: dict[str, tuple[Any, list[int]]] = {}
        if "train" in needed or "val" in needed:
            train = self._read(self.spec.train_list)
            kept, val = carve(
                train.targets, range(len(train.targets)), self.hparams.val_fraction, self.hparams.split_seed
            )
            splits["train"], splits["val"] = (train, kept), (train, val)
        if "test" in needed:
            test = self._read(self.spec.test_list)
            splits["test"] = (test, list(range(len(test.targets))))
        return {k: v for k, v in splits.items() if k in needed}


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels), otherwise as `CIFAR10DataModule`."""

    dataset_name = "CIFAR100"
