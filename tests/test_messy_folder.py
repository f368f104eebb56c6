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
