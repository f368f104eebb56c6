"""`VisionDataModule`: what every data module shares. It takes the model's preprocessing (timm's data config) at
`setup`, builds timm's transforms (augmented for training, never for validation and test), splits, batches, and
counts the images it had to skip. The data sets themselves are subclasses: `vit.data` and `vit.cifar`.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import lightning as L
import torch
from PIL import Image
from timm.data import auto_augment, create_transform, resolve_data_config
from torch.utils.data import DataLoader
from torchvision import transforms

from vit.datasets import (
    EachImage,
    EightBitToModelInput,
    ImageDataset,
    batch_random_erasing,
    batch_random_resized_crop,
    collate_skipping,
)
from vit.images import decode_size
from vit.lightning_notes import silence_lightning_notes
from vit.model import fit_channels

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
    for key, values in fit_channels(out, out["input_size"][0]).items():  # timm's RGB defaults serve a grey model
        out[key] = [float(v) for v in values]
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


def check_auto_augment(policy: str | None) -> None:
    """Refuse a policy string timm cannot parse now, in one line, rather than at `setup` with timm's bare assert."""
    if not policy:
        return
    try:  # timm's own parser, on a small image: what `train_transform` will build
        create_transform(32, is_training=True, auto_augment=policy)
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        reason = f" ({e})" if str(e) else ""
        raise ValueError(
            f"auto_augment={policy!r}: not a timm augmentation policy{reason}; e.g. 'rand-m9-mstd0.5-inc1' "
            "(RandAugment), 'augmix-m5' (AugMix), 'original' (AutoAugment), or null for none"
        ) from None


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
        check_auto_augment(auto_augment)
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
        """One warning for the stage's unreadable images: how many, and the first three with their reasons."""
        if self.skipped:
            named = [f"{name} ({reason})" for name, reason in list(self.skipped.items())[:3]]
            more = f"; and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            warnings.warn(
                f"skipped {len(self.skipped)} unreadable image(s): {'; '.join(named)}{more}", UserWarning, stacklevel=1
            )
            self.skipped.clear()
