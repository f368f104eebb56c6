"""A local CIFAR copy in torchvision's layout, as a cluster without internet has it: a folder one level off, an
incomplete copy or a batch file that does not hold together stops with one line naming the file, before any
download or training."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torchvision
from _images import write_cifar10

from vit.data import CIFAR10DataModule, CIFAR100DataModule


def _no_download(*args, **kwargs):
    raise AssertionError("tried to download")


@pytest.mark.parametrize("download", [True, False])
def test_a_data_dir_that_is_the_cifar_folder_itself_names_its_parent_and_downloads_nothing(
    tmp_path, monkeypatch, download
):
    write_cifar10(tmp_path)
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", _no_download)
    dm = CIFAR10DataModule(tmp_path / "cifar-10-batches-py", download=download, num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py holds the CIFAR10 files itself") as e:
        dm.prepare_data()
        dm.setup("fit")
    assert str(e.value).endswith(f"here {tmp_path.resolve()}")


def test_an_incomplete_cifar_copy_names_the_missing_file(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match=r"an incomplete CIFAR10 copy \(missing test_batch\); pass --data"):
        CIFAR10DataModule(tmp_path, download=False, num_workers=0).setup("fit")


def _rewrite(path: Path, change) -> None:
    with open(path, "rb") as f:
        entry = pickle.load(f)
    change(entry)
    with open(path, "wb") as f:
        pickle.dump(entry, f)


@pytest.mark.parametrize(
    "file, change, message",
    [
        ("data_batch_2", lambda e: e.update(labels=e["labels"][:-1]), "data_batch_2: 8 images but 7 labels"),
        ("data_batch_3", lambda e: e["labels"].__setitem__(0, 10), "data_batch_3: label 10 is not a class index"),
        ("data_batch_1", lambda e: e.update(data=e["data"][:, :1024]), r"data_batch_1: 'data' has shape \(8, 1024\)"),
        ("test_batch", lambda e: e.pop("labels"), "test_batch: no 'labels' or 'fine_labels' entry"),
        ("batches.meta", lambda e: e.pop("label_names"), "batches.meta: no 'label_names' entry"),
    ],
    ids=["fewer-labels", "label-out-of-range", "short-rows", "no-labels", "meta-without-names"],
)
def test_a_cifar_file_that_does_not_hold_together_is_one_error_naming_it(tmp_path, file, change, message):
    write_cifar10(tmp_path)
    _rewrite(tmp_path / "cifar-10-batches-py" / file, change)
    dm = CIFAR10DataModule(tmp_path, download=False, num_workers=0)
    with pytest.raises(ValueError, match=message):
        dm.setup("fit")
        dm.setup("test")


def test_cifar100_copy_one_level_too_deep_names_its_parent(tmp_path):
    (tmp_path / "cifar-100-python").mkdir()
    for name in ("train", "test", "meta"):
        (tmp_path / "cifar-100-python" / name).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python holds the CIFAR100 files itself"):
        CIFAR100DataModule(tmp_path / "cifar-100-python", download=False).setup("fit")
