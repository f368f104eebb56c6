"""The data modules, on data the tests write: digits, an ImageFolder tree with broken files, a CIFAR folder."""

from __future__ import annotations

import pickle
import random

import lightning as L
import numpy as np
import pytest
import torch
import torchvision
from _images import CIFAR10_NAMES, write_broken_images, write_cifar10, write_image_folder
from lightning.pytorch.callbacks import Callback
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.data.auto_augment import RandAugment

from vit.data import CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule
from vit.datasets import ImageDataset
from vit.module import ViTClassifier

# Identity preprocessing: tensors are pixel / 255, so they can be compared with the files' pixels.
RAW_8 = {"input_size": [1, 8, 8], "mean": [0.0], "std": [1.0], "crop_pct": 1.0}
RAW_RGB_16 = {"input_size": [3, 16, 16], "mean": [0.0] * 3, "std": [1.0] * 3, "crop_pct": 1.0}


def tiny_trainer(**kw) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**options, **kw})


def tiny_classifier(img: int = 16, chans: int = 3, **kw) -> ViTClassifier:
    config = dict(img_size=img, in_chans=chans, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    return ViTClassifier(model_name=None, model_config=config, **kw)


def as_rows(images: np.ndarray, labels) -> set[tuple[bytes, int]]:
    return {(np.asarray(im, dtype=np.uint8).tobytes(), int(y)) for im, y in zip(images, labels)}


def test_digits_test_split_is_the_fixed_sklearn_split_of_360_images():
    digits = load_digits()
    _, x_test, _, y_test = train_test_split(
        digits.images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    dm = DigitsDataModule(preprocessing=RAW_8)
    dm.setup("test")
    test = dm.datasets["test"]
    assert len(test) == 360
    ours = [test[i] for i in range(len(test))]
    expected = as_rows(np.round(x_test * 255 / 16), y_test)
    assert as_rows([np.round(x[0].numpy() * 255) for x, _ in ours], [y for _, y in ours]) == expected


def test_digits_validation_is_carved_from_the_other_80_percent():
    dm = DigitsDataModule(preprocessing=RAW_8, val_fraction=0.2)
    dm.setup("fit")
    dm.setup("test")
    train, val, test = (set(dm.datasets[s].indices) for s in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train) + len(val) == 1797 - 360
    assert len(val) == round(0.2 * (1797 - 360))


class _KeepBatches(Callback):
    def __init__(self):
        self.train, self.val = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.train.append(batch[0].clone())

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self.val.append(batch[0].clone())


def test_digits_augment_training_batches_only(tmp_path):
    dm = DigitsDataModule(batch_size=2000, scale=(0.5, 1.0))
    keep = _KeepBatches()
    tiny_trainer(max_epochs=1, callbacks=[keep]).fit(tiny_classifier(img=16, chans=1), datamodule=dm)
    stored = {split: torch.stack([x for x, _ in dm.datasets[split]]) for split in ("train", "val")}
    (train,), val = keep.train, keep.val[-1]  # the last validation batch is the real one (not the sanity check)
    assert torch.equal(val, stored["val"])  # validation images arrive exactly as stored
    # training images arrive cropped: none matches its stored version (the loader shuffles, so compare sets)
    assert not any(torch.equal(a, b) for a in train[:50] for b in stored["train"])


def test_image_folder_validation_is_not_augmented_while_training_is(tmp_path):
    write_image_folder(tmp_path / "train", per_class=6)
    dm = ImageFolderDataModule(tmp_path / "train", val_fraction=0.5, num_workers=0, preprocessing=RAW_RGB_16)
    dm.setup("fit")
    torch.manual_seed(0)
    val, train = dm.datasets["val"], dm.datasets["train"]
    assert all(torch.equal(val[i][0], val[i][0]) for i in range(len(val)))
    assert any(not torch.equal(train[i][0], train[i][0]) for i in range(len(train)))  # the control


def test_image_folder_records_class_names_and_carves_validation(tmp_path):
    write_image_folder(tmp_path / "train", classes=("owl", "cat", "dog"), per_class=6)
    dm = ImageFolderDataModule(tmp_path / "train", val_fraction=0.5, num_workers=0, preprocessing=RAW_RGB_16)
    assert dm.class_names == ["cat", "dog", "owl"]
    dm.setup("fit")
    val = dm.datasets["val"]
    assert len(dm.datasets["train"]) == len(val) == 9
    assert sorted(val.source.targets[i] for i in val.indices) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # stratified


def test_image_folder_maps_val_dir_classes_by_name(tmp_path):
    write_image_folder(tmp_path / "train", classes=("a", "b", "c"))
    write_image_folder(tmp_path / "val", classes=("c",), per_class=2)  # only the last class
    dm = ImageFolderDataModule(tmp_path / "train", val_dir=tmp_path / "val", num_workers=0, preprocessing=RAW_RGB_16)
    dm.setup("fit")
    assert [y for _, y in dm.datasets["val"]] == [2, 2]
    assert len(dm.datasets["train"]) == 18  # nothing carved


def test_val_dir_with_a_class_unknown_to_training_is_an_error_naming_it(tmp_path):
    write_image_folder(tmp_path / "train", classes=("a", "b"))
    write_image_folder(tmp_path / "val", classes=("zebra",), per_class=1)
    dm = ImageFolderDataModule(tmp_path / "train", val_dir=tmp_path / "val", num_workers=0, preprocessing=RAW_RGB_16)
    with pytest.raises(ValueError, match="zebra"):
        dm.setup("fit")


def test_train_dir_without_images_is_an_error_naming_the_folder(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("no images here")
    (tmp_path / "empty" / "dog").mkdir()
    dm = ImageFolderDataModule(tmp_path / "empty", num_workers=0)
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'}: no images"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolderDataModule(tmp_path / "empty" / "cat")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataModule(tmp_path / "nowhere")


def test_testing_an_image_folder_without_test_dir_says_how_to_give_one(tmp_path):
    write_image_folder(tmp_path / "train", classes=("a", "b"))
    dm = ImageFolderDataModule(tmp_path / "train", num_workers=0, preprocessing=RAW_RGB_16)
    with pytest.raises(ValueError, match=r"give test_dir \(on the command line, --data\.test_dir"):  # both users
        dm.setup("test")


def test_unreadable_images_are_dropped_from_batches_and_reported(tmp_path):
    write_image_folder(tmp_path / "train", per_class=4)
    broken = write_broken_images(tmp_path / "train" / "cat")
    dm = ImageFolderDataModule(
        tmp_path / "train", val_fraction=0.25, batch_size=64, num_workers=0, preprocessing=RAW_RGB_16
    )
    dm.setup("fit")
    seen, skipped = 0, set()
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        for batch in loader:
            seen += len(batch[0])
            skipped |= {name for name, _ in batch[2]} if len(batch) == 3 else set()
    assert (seen, skipped) == (12, {str(p) for p in broken})  # every readable image, once (one batch per split)


def test_randaugment_at_full_magnitude_posterizes_to_black_instead_of_dropping_the_image(tmp_path):
    # timm's 'inc1' RandAugment (the default) keeps 0 bits at magnitude 10, which Pillow refuses with a ValueError:
    # about 1 training image in 700 was dropped and counted as unreadable
    write_image_folder(tmp_path / "train", per_class=2)
    dm = ImageFolderDataModule(tmp_path / "train", num_workers=0, preprocessing=RAW_RGB_16)
    dm.setup("fit")
    rand_augment = next(step for step in dm.datasets["train"].transform.transforms if hasattr(step, "ops"))
    op = next(op for op in rand_augment.ops if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    assert np.asarray(op(Image.new("RGB", (16, 16), (200, 120, 40)))).max() == 0


def test_unreadable_images_never_stop_training_and_get_one_counting_warning(tmp_path):
    write_image_folder(tmp_path / "train", per_class=4)
    broken = write_broken_images(tmp_path / "train" / "dog")
    dm = ImageFolderDataModule(tmp_path / "train", val_fraction=0.25, batch_size=4, num_workers=1, hflip=0.0)
    model = tiny_classifier(lr=1e-3)
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\)") as record:
        tiny_trainer(max_epochs=2).fit(model, datamodule=dm)
    (message,) = [str(w.message) for w in record if "unreadable" in str(w.message)]
    assert all(str(path) in message for path in broken)  # each file named
    assert model.class_names == ["cat", "dog", "fox"]


def test_training_reads_an_image_as_vit_predict_does(tmp_path):
    """Upright by its EXIF orientation, transparency on white, 16-bit scaled: a model must not train on images
    that `vit predict` would show it otherwise."""
    from vit.datasets import FileImages
    from vit.images import read_image

    rng = np.random.default_rng(0)
    rotated = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to show it upright
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 65536, (8, 8), dtype=np.uint16)).save(tmp_path / "deep.png")
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    files = FileImages([(str(tmp_path / name), 0) for name in ("rotated.jpg", "deep.png", "clear.png")])
    for i, name in enumerate(("rotated.jpg", "deep.png", "clear.png")):
        assert np.array_equal(np.asarray(files.load(i, "RGB")), np.asarray(read_image(tmp_path / name, "RGB")))
    assert files.load(0, "RGB").size == (12, 20)  # stood upright


def test_a_large_jpeg_is_evaluated_as_vit_predict_sees_it_and_trained_on_at_reduced_scale(tmp_path):
    """`vit predict` decodes a large JPEG at reduced scale (libjpeg's draft); `vit test` must see the same pixels,
    and training may decode it smaller too, as long as its smallest random crop still covers the input size."""
    from vit.images import decode_size
    from vit.predict import Predictor

    smooth = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    photo = Image.fromarray(smooth).resize((1600, 1200), Image.BICUBIC)  # a photo's size, kept small for the test
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            photo.save(tmp_path / split / c / "photo.jpg", quality=90)
    folders = dict(val_dir=tmp_path / "test", test_dir=tmp_path / "test")
    preprocessing = {"input_size": [3, 32, 32], "crop_pct": 0.875}
    data = ImageFolderDataModule(tmp_path / "train", **folders, num_workers=0, preprocessing=preprocessing)
    data.setup("fit")
    data.setup("test")
    model = tiny_classifier(img=32, num_classes=2).model
    predictor = Predictor(model, data_config=data.data_config)
    x, _ = data.datasets["test"][0]
    assert torch.equal(x, predictor.preprocess(tmp_path / "test" / "a" / "photo.jpg"))  # bit for bit
    train = data.datasets["train"]
    decoded = train.source.load(0, "RGB", train.min_size)
    smallest_crop = min(decoded.size) * (0.08 * 3 / 4) ** 0.5  # scale[0] of the area at aspect 3:4
    assert min(decoded.size) < 1200 and smallest_crop >= 32 and train.min_size == decode_size(data.data_config, 0.08)
    assert decode_size(data.data_config, 0.0) is None  # crops of any size: decoded in full


# Python 3 pickles bytes and numpy buffers under protocol 2 as `_codecs.encode(text, 'latin1')` calls, and numpy
# arrays under protocol 5 (pickle.HIGHEST_PROTOCOL) as `numpy._core.numeric._frombuffer` calls
@pytest.mark.parametrize("protocol", [pickle.DEFAULT_PROTOCOL, 2, 5])
def test_cifar10_folder_in_torchvision_layout_loads_offline(tmp_path, monkeypatch, protocol):
    train_images, train_labels, test_images, test_labels = write_cifar10(tmp_path, protocol=protocol)
    dm = CIFAR10DataModule(
        tmp_path,
        download=False,
        num_workers=0,
        val_fraction=0.25,
        preprocessing={"mean": [0.0] * 3, "std": [1.0] * 3, "input_size": [3, 32, 32]},
    )
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert dm.class_names == CIFAR10_NAMES
    # torchvision's own reader is the oracle for the layout (its md5 check knows only the real files)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    reference = torchvision.datasets.CIFAR10(str(tmp_path), train=True, download=False)
    source = dm.datasets["train"].source
    assert np.array_equal(source.images, reference.data) and source.targets == reference.targets
    assert np.array_equal(reference.data, train_images)
    val = dm.datasets["val"]
    x, y = val[0]
    j = val.indices[0]
    assert y == train_labels[j]
    assert torch.allclose(x, torch.from_numpy(train_images[j]).permute(2, 0, 1) / 255, atol=1e-6)
    assert len(dm.datasets["train"]) + len(val) == len(train_images)
    test = dm.datasets["test"]
    assert as_rows([np.round(x.permute(1, 2, 0).numpy() * 255) for x, _ in test], [y for _, y in test]) == as_rows(
        test_images, test_labels
    )


def test_missing_cifar_copy_without_download_names_the_folder(tmp_path):
    dm = CIFAR10DataModule(tmp_path / "data", download=False)
    dm.prepare_data()  # nothing to do: no download asked for
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*download"):
        dm.setup("fit")


class _Exploit:
    def __reduce__(self):
        return (print, ("unpickling ran code",))


def test_cifar_files_are_read_without_running_pickled_code(tmp_path, capsys):
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_NAMES, "payload": _Exploit()}, f)
    dm = CIFAR10DataModule(tmp_path, download=False, num_workers=0)
    with pytest.raises(ValueError, match=r"batches\.meta.*refused"):
        dm.setup("fit")
    assert "unpickling ran code" not in capsys.readouterr().out


def test_in_memory_image_folder_holds_the_evaluation_tensors_and_leaves_unreadable_files_out(tmp_path):
    write_image_folder(tmp_path / "train", per_class=6)
    broken = write_broken_images(tmp_path / "train" / "cat")
    options = dict(val_fraction=0.25, batch_size=4, preprocessing=RAW_RGB_16, split_seed=0)
    on_disk = ImageFolderDataModule(tmp_path / "train", num_workers=0, **options)
    in_memory = ImageFolderDataModule(tmp_path / "train", in_memory=True, auto_augment=None, **options)
    on_disk.setup("fit")
    in_memory.setup("fit")
    assert in_memory.num_workers == 0  # batches are slices of a tensor: no loader processes
    assert set(in_memory.skipped) == {str(p) for p in broken}  # counted once, at caching
    for split in ("train", "val"):
        plain = on_disk.datasets[split]  # the same split decoded per item, without augmentation
        plain = ImageDataset(plain.source, plain.indices, on_disk.eval_transform(), "RGB")
        expected = [item for item in plain if isinstance(item[0], torch.Tensor)]
        x, y = in_memory.datasets[split].cached
        assert x.dtype == torch.uint8  # a quarter of float32's memory
        finish = in_memory.eight_bit_to_model_input()
        assert torch.equal(finish(x), torch.stack([e[0] for e in expected]))  # the evaluation transform, bit for bit
        assert y.tolist() == [e[1] for e in expected]
    batches = list(in_memory.train_dataloader())
    assert [len(b[0]) for b in batches] == [4, 4, 4] and all(len(b) == 2 for b in batches)
    assert all(b[0].dtype == torch.float32 for b in batches)
    x, y = in_memory.datasets["train"].cached  # each batch: distinct rows of the cache, with their labels
    x = finish(x)
    rows = [next(i for i in range(len(x)) if torch.equal(x[i], image)) for b in batches for image in b[0]]
    assert len(set(rows)) == len(rows) and y[rows].tolist() == torch.cat([b[1] for b in batches]).tolist()


def test_in_memory_image_folder_trains_on_batch_augmented_images(tmp_path):
    write_image_folder(tmp_path / "train", per_class=6)
    dm = ImageFolderDataModule(
        tmp_path / "train", in_memory=True, auto_augment=None, batch_size=64, preprocessing=RAW_RGB_16
    )
    keep = _KeepBatches()
    tiny_trainer(max_epochs=1, callbacks=[keep]).fit(tiny_classifier(img=16), datamodule=dm)
    finish = dm.eight_bit_to_model_input()
    (train,), stored = keep.train, finish(dm.datasets["train"].cached[0])
    assert torch.equal(keep.val[-1], finish(dm.datasets["val"].cached[0]))  # validation exactly as stored
    assert not any(torch.equal(a, b) for a in train for b in stored)  # training images cropped / flipped


def test_in_memory_training_images_get_timms_randaugment_one_by_one_and_validation_images_none(tmp_path):
    write_image_folder(tmp_path / "train", per_class=6)
    options = dict(in_memory=True, val_fraction=0.25, preprocessing=RAW_RGB_16)  # RandAugment: the default
    assert ImageFolderDataModule(tmp_path / "train", **options).num_workers > 0  # its ops run in the workers
    dm = ImageFolderDataModule(tmp_path / "train", num_workers=0, **options)
    dm.setup("fit")
    train, val, finish = dm.datasets["train"], dm.datasets["val"], dm.eight_bit_to_model_input()
    rows = list(range(len(train)))

    def seeded(fn):
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        return fn()

    # the oracle: timm's own colour stage on each cached image as a PIL image, then timm's ToTensor + Normalize
    colour = dm.colour_transform()
    assert [type(t) for t in colour.transforms] == [RandAugment]  # that stage alone: no crop, flip or erasing
    pil = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in train.cached[0]]
    expected = seeded(lambda: torch.stack([dm.eval_transform()(colour(image)) for image in pil]))
    batch, _ = seeded(lambda: train.__getitems__(rows))
    assert torch.equal(batch, expected)
    assert not torch.equal(batch, finish(train.cached[0]))  # the comparison above can fail
    travelled = pickle.loads(pickle.dumps(train))  # as the dataset reaches spawned workers (macOS, Windows)
    assert torch.equal(seeded(lambda: travelled.__getitems__(rows))[0], expected)
    assert torch.equal(val.__getitems__(list(range(len(val))))[0], finish(val.cached[0]))  # validation untouched


@pytest.mark.parametrize("channels", [1, 3])
def test_each_image_runs_a_pil_transform_on_every_image_of_a_uint8_batch(channels):
    from PIL import ImageOps

    from vit.datasets import EachImage

    x = torch.randint(0, 256, (5, channels, 7, 9), dtype=torch.uint8)
    assert torch.equal(EachImage(ImageOps.invert)(x), 255 - x)
    assert torch.equal(EachImage(ImageOps.invert)(x[0]), 255 - x[0])  # one image (C, H, W), as __getitem__ has it


def test_batch_random_erasing_draws_rectangles_as_timms_random_erasing_draws_them():
    from timm.data.random_erasing import RandomErasing

    from vit.datasets import batch_random_erasing

    torch.manual_seed(0)
    random.seed(0)
    ones = torch.ones(4000, 3, 24, 32)  # not square: whether a rectangle fits depends on its orientation

    def erased(batch: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Share of images erased; quantiles of the erased fraction, the rectangles' heights and widths."""
        zero = batch[:, 0] == 0
        hit = zero.flatten(1).any(1)
        rows, cols = zero.any(2).sum(1)[hit], zero.any(1).sum(1)[hit]
        assert torch.equal(zero.flatten(1).sum(1)[hit], rows * cols)  # each a rectangle
        assert torch.equal(batch == 0, zero[:, None].expand_as(batch))  # the same on every channel
        q = torch.tensor([0.1, 0.5, 0.9])
        return hit.float().mean().item(), torch.stack(
            [torch.quantile(v.float(), q) for v in (zero.flatten(1).float().mean(1)[hit], rows, cols)]
        )

    ours, timms = (
        erased(batch_random_erasing(ones, 0.5)),
        erased(RandomErasing(0.5, mode="const", device="cpu")(ones.clone())),
    )
    assert abs(ours[0] - 0.5) < 0.04 and abs(timms[0] - 0.5) < 0.04
    assert torch.allclose(ours[1][0], timms[1][0], atol=0.02)  # erased fraction: 0.05 / 0.17 / 0.30
    assert torch.allclose(ours[1][1:], timms[1][1:], atol=2.0)  # heights and widths in pixels
    assert torch.equal(batch_random_erasing(ones, 0.0), ones)


def test_batch_augmentation_rotates_by_up_to_degrees_and_is_exact_without_changes():
    from vit.datasets import batch_random_resized_crop

    bar = torch.zeros(64, 1, 16, 16)
    bar[:, :, :, 7:9] = 1.0  # a vertical bar through the centre
    whole = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(batch_random_resized_crop(bar, **whole), bar, atol=1e-6)  # the whole image, unturned
    turned = batch_random_resized_crop(bar, **whole, degrees=90)
    on_bar = turned[:, 0, :, 7:9].mean(dim=(1, 2))
    assert (on_bar < 0.9).float().mean() > 0.8  # most images turned away from the column
    assert torch.allclose(turned.mean(dim=(1, 2, 3)), bar.mean(dim=(1, 2, 3)), atol=0.06)  # the bar is kept, turned


@pytest.mark.parametrize(("fraction", "empty"), [(0.0, "validation"), (0.001, "validation"), (1.0, "training")])
def test_a_validation_fraction_that_empties_a_split_names_the_split(fraction, empty):
    from vit.datasets import carve

    with pytest.raises(ValueError) as error:
        carve([0, 1] * 50, range(100), fraction, seed=0)
    assert str(error.value) == (
        f"val_fraction={fraction} of 100 images leaves no {empty} images; give a fraction between 0.01 and 0.99"
    )
