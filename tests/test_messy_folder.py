"""A messy training folder: every file `vit predict` would classify is a training image of its class folder; none
is silently left out (a broken link stays in, to be skipped and counted when it fails to read)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vit.data import ImageFolderDataModule
from vit.images import find_images


def _image(path: Path, fmt: str | None = None, mode: str = "RGB") -> None:
    rng = np.random.default_rng(len(path.name))
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).convert(mode).save(path, format=fmt)


def test_training_finds_every_image_vit_predict_finds(tmp_path):
    root = tmp_path / "train"
    for name in ("ant", "bee"):
        (root / name / "nested").mkdir(parents=True)
        _image(root / name / "plain.png")
        _image(root / name / "anim.gif", mode="P")
        _image(root / name / "saved by a browser.jfif", "JPEG")
        _image(root / name / "nested" / "été.tga", "TGA")
        _image(root / name / "UPPER.JPEG", "JPEG")
        (root / name / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (root / name / "notes.txt").write_text("not an image, and not named like one")
    (root / "bee" / "gone.jpg").symlink_to(tmp_path / "moved_away.jpg")
    data = ImageFolderDataModule(root, preprocessing={"input_size": [3, 16, 16]}, num_workers=0, val_fraction=0.25)
    data.setup("fit")
    found = {}
    for split in ("train", "val"):
        source, indices = data.datasets[split].source, data.datasets[split].indices
        found.update({source.paths[i]: data.class_names[source.targets[i]] for i in indices})
    expected = {str(p): Path(p).relative_to(root).parts[0] for p in find_images([root])}
    assert found == expected and len(found) == 11


def test_a_symbolic_link_loop_in_a_class_folder_is_skipped_not_trained_on_forty_times(tmp_path, recwarn):
    root = tmp_path / "train"
    for name in ("ant", "bee"):
        (root / name / "sub").mkdir(parents=True)
        _image(root / name / "a.png")
        _image(root / name / "sub" / "b.png")
    (root / "ant" / "sub" / "again").symlink_to(root / "ant", target_is_directory=True)  # a loop
    data = ImageFolderDataModule(root, preprocessing={"input_size": [3, 16, 16]}, num_workers=0, val_fraction=0.25)
    data.setup("fit")
    paths = [data.datasets[s].source.paths[i] for s in ("train", "val") for i in data.datasets[s].indices]
    assert sorted(paths) == sorted(str(p) for p in find_images([root])) and len(paths) == 4
    assert any("a symbolic link back to" in str(w.message) for w in recwarn)


def test_images_are_listed_in_torchvisions_order_so_that_splits_stay_as_they_were(tmp_path):
    from torchvision.datasets.folder import make_dataset

    root = tmp_path / "train"
    for name in ("ant", "bee"):
        for sub in ("", "a", "a b", "a/z", "b-c"):
            (root / name / sub).mkdir(parents=True, exist_ok=True)
            for stem in ("x", "Y", "x-1", "x.1"):
                _image(root / name / sub / f"{stem}.png")
    data = ImageFolderDataModule(root, preprocessing={"input_size": [3, 16, 16]}, num_workers=0)
    data.setup("fit")
    expected = make_dataset(str(root), {"ant": 0, "bee": 1}, extensions=(".png",))
    assert list(zip(data.datasets["train"].source.paths, data.datasets["train"].source.targets)) == expected
