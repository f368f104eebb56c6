"""CIFAR-10 and CIFAR-100 from torchvision's download and on-disk layout: the python batch files, read without
running pickled code and checked, and their data modules."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vit.datamodule import VisionDataModule
from vit.datasets import ArrayImages, carve


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's python files are pickles of numpy arrays and lists: allow exactly that and nothing that could
    run code."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            # protocol 5 (pickle.HIGHEST_PROTOCOL; Python 3.14's default): frombuffer(...).reshape(...) of the bytes
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),  # Python 3's protocol-2 bytes; a pure function, as torch's weights_only allows
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: not a plain numpy array")
        return super().find_class(module, name)


def read_cifar_file(path: Path) -> dict[str, Any]:
    """A CIFAR python file (a pickled dict of numpy arrays and lists), read without running pickled code."""
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable CIFAR batch file ({e})") from None


def cifar_entry(entry: dict[str, Any], keys: Sequence[str], path: Path) -> Any:
    """The first of `keys` in a CIFAR file's dict; a ValueError naming the file and the keys it has otherwise."""
    for key in keys:
        if key in entry:
            return entry[key]
    found = ", ".join(map(repr, entry)) if isinstance(entry, dict) else type(entry).__name__
    raise ValueError(f"{path}: no {' or '.join(map(repr, keys))} entry (found {found})")


def read_cifar_batch(path: Path, label_keys: Sequence[str], num_classes: int) -> tuple[np.ndarray, list[int]]:
    """(images (N, 32, 32, 3) uint8, labels) of a CIFAR batch file, checked: rows of 3,072 pixels (R, G, B planes),
    one label per image, each a class index, so that a bad copy stops with its file named instead of training on
    shifted or impossible labels."""
    entry = read_cifar_file(path)
    data = np.asarray(cifar_entry(entry, ["data"], path))
    labels = [int(y) for y in cifar_entry(entry, label_keys, path)]
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' has shape {data.shape}, not (N, 3072): rows of 32x32 R, G, B planes")
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise ValueError(f"{path}: label {bad[0]} is not a class index (its meta file names {num_classes} classes)")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


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
        """Download and extract the archive when `download` is on and a file is missing."""
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
        return ArrayImages(np.concatenate(images), targets, self.dataset_name)

    def setup(self, stage: str) -> None:
        """Check that the copy is whole, read the class names from its meta file, then build the splits."""
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
