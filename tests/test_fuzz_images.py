"""Fuzzing the image path: random bytes and mutated PNG/JPEG/GIF/BMP/WebP files against the decoding and
preprocessing of `vit predict` and of the data modules. Every input gives a tensor or a clean per-file error;
nothing crashes the run or hangs (hypothesis' deadline bounds each example)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tiny_checkpoints import tiny_model

from vit.datasets import FileImages, ImageDataset, Skipped
from vit.predict import Predictor, _Images

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
FUZZ = settings(
    max_examples=150, deadline=2000, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _valid(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


VALID = {fmt: _valid(fmt) for fmt in FORMATS}


@st.composite
def damaged_images(draw: st.DrawFn) -> bytes:
    """A valid file with some bytes overwritten, a slice cut out, or its tail cut off; or plain random bytes."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=512))
    data = bytearray(VALID[draw(st.sampled_from(FORMATS))])
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        start = draw(st.integers(0, len(data)))
        del data[start : start + draw(st.integers(0, 64))]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(tiny_model(), num_workers=0)


def test_the_fuzzer_makes_both_readable_and_unreadable_images(folder, predictor):
    # the mutated inputs are not all rejected up front (which would test nothing) nor all accepted
    outcomes = set()

    @FUZZ
    @given(damaged_images())
    def run(data: bytes) -> None:
        (folder / "probe.png").write_bytes(data)
        outcomes.add(_Images([folder / "probe.png"], predictor.preprocess)[0][2] is None)

    run()
    assert outcomes == {True, False}


@FUZZ
@given(data=damaged_images(), suffix=st.sampled_from([".png", ".jpg", ".gif", ".bmp", ".webp"]))
def test_predict_gives_a_tensor_or_a_one_line_error_for_any_bytes(folder, predictor, data, suffix):
    path = folder / f"predict{suffix}"
    path.write_bytes(data)
    _, x, error = _Images([path], predictor.preprocess)[0]
    if error is None:
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all()
    else:
        assert x is None and error.strip() and "\n" not in error and "Traceback" not in error


@FUZZ
@given(data=damaged_images(), mode=st.sampled_from(["RGB", "L"]))
def test_training_data_gives_a_tensor_or_a_counted_skip_for_any_bytes(folder, data, mode):
    from timm.data import create_transform

    path = folder / "train.png"
    path.write_bytes(data)
    channels = 3 if mode == "RGB" else 1
    transform = create_transform((channels, 16, 16), is_training=True, mean=(0.5,) * channels, std=(0.5,) * channels)
    # an exception other than the reader's own would end the training run: it must not escape
    item = ImageDataset(FileImages([(str(path), 0)]), [0], transform, mode)[0]
    if isinstance(item, Skipped):
        assert item[0] == str(path) and item[1].strip()
    else:
        assert item[0].shape == (channels, 16, 16) and item[1] == 0
