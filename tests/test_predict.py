"""`vit.Predictor` and `vit predict`: every kind of input a user throws at it, checked against images built by
hand and timm's own transforms on the checkpoint's preprocessing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

import vit
from tests.tiny_checkpoints import (
    CLASS_NAMES,
    data_config,
    tiny_model,
    write_lightning_ckpt,
    write_safetensors,
    write_timm_state_dict,
)
from vit.cli import main
from vit.images import read_image
from vit.predict import Predictor

ROOT = Path(__file__).resolve().parents[1]
STEP = 2 / 255  # one 8-bit level after normalising with std 0.5


def smooth_rgb(h: int, w: int) -> np.ndarray:
    """A smooth, asymmetric colour image: JPEG keeps it nearly intact, and any rotation or flip changes it."""
    y = np.linspace(0, 1, h, endpoint=False, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, w, endpoint=False, dtype=np.float32)[None, :]
    channels = np.broadcast_arrays(255 * x, 255 * y, 127 + 120 * np.sin(6 * x + 3 * y * y))
    return np.stack(channels, -1).round().astype(np.uint8)


def reference(image: Image.Image, model=None, **data) -> torch.Tensor:
    """timm's eval transform, built here from the checkpoint's preprocessing, on an image prepared by hand."""
    return create_transform(**data_config(model or tiny_model(), **data), is_training=False)(image)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return write_safetensors(tmp_path / "tiny.safetensors")


@pytest.fixture
def predictor(checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(checkpoint, num_workers=0)


def classified(result: dict) -> bool:
    return result["error"] is None and len(result["predictions"]) == 5


# ----------------------------------------------------------------------------------------- input kinds
def test_grayscale_image_is_fed_as_three_equal_channels(predictor, tmp_path):
    grey = smooth_rgb(40, 50)[..., 0]
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    expected = reference(Image.fromarray(np.stack([grey] * 3, -1)))
    torch.testing.assert_close(predictor.preprocess(tmp_path / "grey.png"), expected, rtol=0, atol=1e-6)
    assert classified(predictor.predict(tmp_path / "grey.png")[0])


def test_palette_image_shows_white_where_transparent(predictor, tmp_path):
    palette = np.array([[0, 0, 0], [200, 30, 30], [30, 200, 30], [30, 30, 200]], np.uint8)
    indices = (np.arange(40)[:, None] // 10 + np.arange(40)[None, :] // 20) % 4
    image = Image.fromarray(indices.astype(np.uint8), "P")
    image.putpalette(palette.flatten().tolist())
    image.save(tmp_path / "palette.png", transparency=0)  # index 0 (black) is transparent
    by_hand = np.where((indices == 0)[..., None], 255, palette[indices]).astype(np.uint8)
    expected = reference(Image.fromarray(by_hand))
    torch.testing.assert_close(predictor.preprocess(tmp_path / "palette.png"), expected, rtol=0, atol=1e-6)
    assert classified(predictor.predict(tmp_path / "palette.png")[0])


def test_rgba_image_is_composited_on_white(predictor, tmp_path):
    rgb = smooth_rgb(40, 40) // 2  # dark, so that dropping the alpha channel instead would be far off
    alpha = np.linspace(0, 255, 40).round().astype(np.uint8)[None, :].repeat(40, 0)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    a = alpha[..., None] / 255.0
    by_hand = (rgb * a + 255 * (1 - a)).round().astype(np.uint8)
    got = predictor.preprocess(tmp_path / "rgba.png")
    torch.testing.assert_close(got, reference(Image.fromarray(by_hand)), rtol=0, atol=1.5 * STEP)
    assert (got - reference(Image.fromarray(rgb))).abs().mean() > 10 * STEP
    assert classified(predictor.predict(tmp_path / "rgba.png")[0])


def test_cmyk_jpeg_is_read_as_its_rgb_colours(predictor, tmp_path):
    rgb = smooth_rgb(48, 48)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    difference = predictor.preprocess(tmp_path / "cmyk.jpg") - reference(Image.fromarray(rgb))
    assert difference.abs().mean() < 2 * STEP  # JPEG's loss only
    assert classified(predictor.predict(tmp_path / "cmyk.jpg")[0])


def test_16_bit_png_is_scaled_to_8_bits_not_clipped(predictor, tmp_path):
    ramp = np.linspace(0, 65535, 48 * 48).reshape(48, 48).round().astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    eight_bit = (ramp / 257).round().astype(np.uint8)  # 65535 -> 255
    expected = reference(Image.fromarray(np.stack([eight_bit] * 3, -1)))
    torch.testing.assert_close(predictor.preprocess(tmp_path / "deep.png"), expected, rtol=0, atol=1e-6)
    assert classified(predictor.predict(tmp_path / "deep.png")[0])


RAMP = np.linspace(0, 1, 24 * 32).reshape(24, 32)  # a gradient over [0, 1], both ends included


# (samples written with Pillow, file suffix, the mode Pillow opens it in, 8-bit reading as a function of the samples)
WIDE_IMAGES = {
    "float_in_0_1": (RAMP.astype(np.float32), "tif", "F", lambda x: 255 * x),
    "float_in_0_255": ((0.3 + 254.4 * RAMP).astype(np.float32), "tif", "F", lambda x: x),
    "float_in_0_65535": ((65535 * RAMP).astype(np.float32), "tif", "F", lambda x: x / 257),
    "int32_in_0_255": ((255 * RAMP).round().astype(np.int32), "tif", "I", lambda x: x),
    "int32_in_0_65535": ((65535 * RAMP).round().astype(np.int32), "tif", "I", lambda x: x / 257),
    "uint16_big_endian": ((65535 * RAMP).round().astype(">u2"), "tif", "I;16B", lambda x: x / 257),
    "dark_uint16": ((200 * RAMP).round().astype(np.uint16), "tif", "I;16", lambda x: x / 257),  # 16 bits: scaled
    "dark_16_bit_pgm": ((200 * RAMP).round().astype(np.uint16), "pgm", "I", lambda x: x / 257),  # Pillow says 'I'
}


@pytest.mark.parametrize("kind", WIDE_IMAGES)
def test_float_and_32_bit_images_are_scaled_to_8_bits_by_their_range(kind, predictor, tmp_path):
    samples, suffix, mode, to_8_bit = WIDE_IMAGES[kind]
    path = tmp_path / f"{kind}.{suffix}"
    if suffix == "pgm":  # written by hand: Pillow before 11.0 cannot write a 16-bit PGM (it reads one)
        path.write_bytes(b"P5 %d %d 65535\n" % samples.shape[::-1] + samples.astype(">u2").tobytes())
    else:
        Image.fromarray(samples).save(path)
    assert Image.open(path).mode == mode
    expected = np.round(to_8_bit(samples.astype(np.float64))).astype(np.uint8)
    assert expected.min() == 0 and expected.max() > 0  # a black reading would be caught
    assert np.array_equal(np.asarray(read_image(path, "L")), expected)
    reference_input = reference(Image.fromarray(np.stack([expected] * 3, -1)))
    torch.testing.assert_close(predictor.preprocess(path), reference_input, rtol=0, atol=1e-6)
    assert classified(predictor.predict(path)[0])


BAD_SAMPLES = {
    "nan": (np.where(RAMP > 0.5, np.nan, RAMP).astype(np.float32), "NaN or infinite"),
    "infinity": (np.where(RAMP > 0.5, np.inf, RAMP).astype(np.float32), "NaN or infinite"),
    "negative_float": ((RAMP - 0.5).astype(np.float32), "from -0.5 to 0.5 ('F' image)"),
    "int32_above_65535": ((70000 * RAMP).round().astype(np.int32), "from 0 to 70000 ('I' image)"),
    "negative_int32": ((300 * RAMP).round().astype(np.int32) - 3, "from -3 to 297 ('I' image)"),
}


@pytest.mark.parametrize("kind", BAD_SAMPLES)
def test_samples_no_scale_shows_are_a_one_line_error_for_that_file(kind, predictor, tmp_path):
    samples, problem = BAD_SAMPLES[kind]
    Image.fromarray(samples).save(tmp_path / "bad.tif")
    Image.fromarray(RAMP.astype(np.float32)).save(tmp_path / "good.tif")
    with pytest.raises(ValueError, match=re.escape(problem)):
        read_image(tmp_path / "bad.tif")
    bad, good = predictor.predict([tmp_path / "bad.tif", tmp_path / "good.tif"])
    assert problem in bad["error"] and "\n" not in bad["error"] and bad["predictions"] == []
    assert classified(good)


def test_vit_predict_names_a_float_image_out_of_range_and_classifies_the_others(checkpoint, tmp_path, capsys):
    Image.fromarray((2 * RAMP - 1).astype(np.float32)).save(tmp_path / "signed.tif")
    Image.fromarray(RAMP.astype(np.float32)).save(tmp_path / "unit.tif")
    argv = ["predict", str(tmp_path / "signed.tif"), str(tmp_path / "unit.tif"), "-c", str(checkpoint)]
    assert main([*argv, "--format", "json"]) == 1
    signed, unit = json.loads(capsys.readouterr().out)
    assert signed["path"] == str(tmp_path / "signed.tif") and "from -1 to 1" in signed["error"]
    (expected,) = Predictor.from_checkpoint(checkpoint, num_workers=0).predict(tmp_path / "unit.tif")
    assert unit["error"] is None and [p["index"] for p in unit["predictions"]] == [
        p["index"] for p in expected["predictions"]
    ]


def test_exif_orientation_is_honoured(predictor, tmp_path):
    upright = Image.fromarray(smooth_rgb(48, 32))
    Image.fromarray(np.asarray(upright)).save(tmp_path / "upright.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the stored pixels are the upright ones turned back
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    stored.save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    got = predictor.preprocess(tmp_path / "rotated.jpg")
    as_displayed = (got - predictor.preprocess(tmp_path / "upright.jpg")).abs().mean()
    as_stored = (got - reference(stored)).abs().mean()
    assert as_displayed < as_stored / 10
    rotated, plain = predictor.predict([tmp_path / "rotated.jpg", tmp_path / "upright.jpg"])
    assert [p["index"] for p in rotated["predictions"]] == [p["index"] for p in plain["predictions"]]


def test_one_pixel_image_is_classified(predictor, tmp_path):
    Image.new("RGB", (1, 1), (200, 10, 30)).save(tmp_path / "dot.png")
    got = predictor.preprocess(tmp_path / "dot.png")
    colour = (torch.tensor([200, 10, 30]) / 255 - 0.5) / 0.5
    torch.testing.assert_close(got, colour[:, None, None].expand(3, 32, 32), rtol=0, atol=1e-5)
    assert classified(predictor.predict(tmp_path / "dot.png")[0])


def test_very_large_jpeg_is_decoded_at_reduced_scale_with_nearly_the_same_pixels(predictor, tmp_path):
    Image.fromarray(smooth_rgb(3000, 4000)).save(tmp_path / "large.jpg", quality=90)
    decoded = read_image(tmp_path / "large.jpg", "RGB", predictor.min_size)
    assert min(decoded.size) >= predictor.min_size and decoded.size[0] <= 4000 // 8
    full_decode = reference(Image.open(tmp_path / "large.jpg").convert("RGB"))
    assert (predictor.preprocess(tmp_path / "large.jpg") - full_decode).abs().max() < 2 * STEP
    assert classified(predictor.predict(tmp_path / "large.jpg")[0])


def test_decompression_bomb_is_a_per_file_error(predictor, tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "bomb.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 64*64 > 2 * 2000: PIL refuses it
    bomb, small = predictor.predict([tmp_path / "bomb.png", tmp_path / "small.png"])
    assert "too large" in bomb["error"] and bomb["predictions"] == []
    assert classified(small)


def test_single_channel_model_takes_colour_images_as_grey(tmp_path):
    model = tiny_model(in_chans=1)
    predictor = Predictor.from_checkpoint(write_safetensors(tmp_path / "grey.safetensors", model), num_workers=0)
    colour = Image.fromarray(smooth_rgb(40, 40))
    colour.save(tmp_path / "colour.png")
    got = predictor.preprocess(tmp_path / "colour.png")
    assert got.shape == (1, 32, 32)
    torch.testing.assert_close(got, reference(colour.convert("L"), model), rtol=0, atol=1e-6)
    assert classified(predictor.predict(tmp_path / "colour.png")[0])


def test_pil_images_are_classified_in_memory(predictor, tmp_path):
    image = Image.fromarray(smooth_rgb(40, 40))
    image.save(tmp_path / "same.png")
    in_memory, on_disk = predictor.predict([image, tmp_path / "same.png"])
    assert in_memory["path"] is None and in_memory["predictions"] == on_disk["predictions"]


def test_folders_are_searched_recursively_in_sorted_order(predictor, tmp_path):
    root = tmp_path / "photos"
    for name in ["b/z.png", "a/y.JPG", "a/deep/er/x.jpeg"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth_rgb(20, 20)).save(root / name)
    (root / "a" / "notes.txt").write_text("not an image, and not named like one")
    results = predictor.predict(root)
    assert [Path(r["path"]).relative_to(root).as_posix() for r in results] == ["a/deep/er/x.jpeg", "a/y.JPG", "b/z.png"]
    assert all(classified(r) for r in results)


def test_unreadable_inputs_are_reported_while_the_others_are_classified(checkpoint, tmp_path):
    Image.fromarray(smooth_rgb(40, 40)).save(tmp_path / "good.jpg", quality=95)
    (tmp_path / "notes.jpg").write_text("hello, I am text")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "good.jpg").read_bytes()[:400])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "nothing_here").mkdir()
    inputs = ["good.jpg", "notes.jpg", "cut.jpg", "empty.png", "missing.jpg", "nothing_here", "good.jpg"]
    predictor = Predictor.from_checkpoint(checkpoint, batch_size=2, num_workers=1)  # errors inside worker batches
    results = predictor.predict([tmp_path / name for name in inputs])
    expected_problem = {
        "notes.jpg": "not an image",
        "cut.jpg": "truncated",
        "empty.png": "empty",
        "missing.jpg": "no such file",
        "nothing_here": "no image files",
    }
    for name, result in zip(inputs, results):
        assert result["path"] == str(tmp_path / name)
        if name in expected_problem:
            assert expected_problem[name] in result["error"] and result["predictions"] == []
            assert result["error"].lower().count(expected_problem[name]) == 1, result["error"]  # said once
        else:
            assert classified(result)


def test_a_broken_symbolic_link_in_a_folder_is_reported_not_dropped(checkpoint, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(smooth_rgb(40, 40)).save(photos / "good.jpg")
    (photos / "gone.jpg").symlink_to(tmp_path / "moved_away.jpg")
    (photos / "also_good.jpg").symlink_to(photos / "good.jpg")
    assert main(["predict", str(photos), "--checkpoint", str(checkpoint), "--format", "json"]) == 1
    results = {Path(r["path"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert sorted(results) == ["also_good.jpg", "gone.jpg", "good.jpg"]
    assert classified(results["good.jpg"]) and classified(results["also_good.jpg"])
    assert (
        results["gone.jpg"]["error"].startswith("broken symbolic link (to ")
        and "moved_away.jpg" in results["gone.jpg"]["error"]
    )


@pytest.mark.parametrize("good", [0, 2])
def test_the_count_of_unreadable_inputs_reads_as_english(good, checkpoint, tmp_path, capsys):
    for i in range(good):
        Image.fromarray(smooth_rgb(40, 40)).save(tmp_path / f"good{i}.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    files = [str(p) for p in sorted(tmp_path.glob("*.jpg"))]
    assert main(["predict", *files, "--checkpoint", str(checkpoint), "--format", "json"]) == 1
    total = "1 input" if good == 0 else f"{good + 1} inputs"
    assert capsys.readouterr().err.endswith(f"vit predict: 1 of {total} could not be classified\n")


# ------------------------------------------------------------------------------------- the predictions
def test_predictions_match_a_plain_loop_over_timm_transforms_and_the_model(checkpoint, tmp_path):
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(np.roll(smooth_rgb(40, 60), 9 * i, axis=1)).save(paths[-1])
    results = Predictor.from_checkpoint(checkpoint, batch_size=2, num_workers=1).predict(paths, topk=3)
    model = tiny_model()
    for path, result in zip(paths, results):
        with torch.no_grad():
            probs = model(reference(Image.open(path).convert("RGB"))[None]).softmax(-1)[0]
        top = probs.topk(3)
        assert [p["index"] for p in result["predictions"]] == top.indices.tolist()
        assert [p["label"] for p in result["predictions"]] == [CLASS_NAMES[i] for i in top.indices]
        np.testing.assert_allclose([p["prob"] for p in result["predictions"]], top.values, rtol=0, atol=1e-6)


def test_lightning_ckpt_preprocessing_and_weights_are_used(tmp_path):
    custom = dict(mean=[0.2, 0.3, 0.4], std=[0.3, 0.2, 0.1], crop_pct=1.0, interpolation="bilinear")
    ckpt = write_lightning_ckpt(tmp_path / "last.ckpt", **custom)
    image = Image.fromarray(smooth_rgb(40, 56))
    predictor = Predictor.from_checkpoint(ckpt, num_workers=0)
    got = predictor.preprocess(image)
    torch.testing.assert_close(got, reference(image, **custom), rtol=0, atol=1e-6)
    assert (got - reference(image)).abs().max() > 0.1  # the defaults would differ
    from_safetensors = Predictor.from_checkpoint(write_safetensors(tmp_path / "same.safetensors", **custom))
    assert predictor.predict(image) == from_safetensors.predict(image)


def test_preprocessing_that_does_not_fit_the_model_is_refused():
    with pytest.raises(ValueError, match="input size 64x64 does not match the model's 32x32"):
        vit.Predictor(tiny_model(), data_config={"input_size": [3, 64, 64]})


def test_topk_is_capped_at_the_number_of_classes(predictor):
    (result,) = predictor.predict(Image.fromarray(smooth_rgb(32, 32)), topk=50)
    assert sorted(p["index"] for p in result["predictions"]) == list(range(len(CLASS_NAMES)))
    assert sum(p["prob"] for p in result["predictions"]) == pytest.approx(1, abs=1e-5)


# ---------------------------------------------------------------------------------------- command line
@pytest.fixture
def images(tmp_path: Path) -> list[str]:
    for name in ("one.png", "two.jpg"):
        Image.fromarray(smooth_rgb(40, 40)).save(tmp_path / name)
    return [str(tmp_path / "one.png"), str(tmp_path / "two.jpg")]


def test_json_output_follows_the_schema(checkpoint, images, capsys):
    gone = str(Path(images[0]).parent / "gone.png")
    status = main(["predict", *images, gone, "-c", str(checkpoint), "--format", "json", "--topk", "3"])
    results = json.loads(capsys.readouterr().out)
    assert status == 1 and [r["path"] for r in results] == [*images, gone]
    for result in results:
        assert set(result) == {"path", "predictions", "error"}
        for prediction in result["predictions"]:
            assert set(prediction) == {"label", "index", "prob"}
            assert isinstance(prediction["index"], int) and prediction["label"] == CLASS_NAMES[prediction["index"]]
            assert isinstance(prediction["prob"], float) and 0 <= prediction["prob"] <= 1
    assert [len(r["predictions"]) for r in results] == [3, 3, 0]
    assert results[0]["error"] is None and results[2]["error"] == "no such file or folder"
    probs = [p["prob"] for p in results[0]["predictions"]]
    assert probs == sorted(probs, reverse=True)


def test_csv_has_one_row_per_path_and_rank(checkpoint, images, capsys):
    assert main(["predict", *images, "-c", str(checkpoint), "--format", "csv", "--topk", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "path,rank,label,index,prob,error"
    assert [line.split(",")[:2] for line in lines[1:]] == [[p, r] for p in images for r in ("1", "2")]


def test_table_lists_labels_probabilities_and_errors(checkpoint, images, capsys):
    assert main(["predict", images[0], "missing.png", "-c", str(checkpoint), "--topk", "1"]) == 1
    out = capsys.readouterr().out
    (result,) = Predictor.from_checkpoint(checkpoint).predict(images[0], topk=1)
    assert result["predictions"][0]["label"] in out and f"{result['predictions'][0]['prob']:.3f}" in out
    assert out.splitlines()[-1] == "missing.png: error: no such file or folder"  # under the table, not in it


@pytest.mark.parametrize(
    "argv",
    [
        ["-c", "DIR/not_a_checkpoint.ckpt"],  # unreadable checkpoint
        ["-c", "DIR/absent.safetensors"],
        ["-c", "CKPT", "--device", "no_such_device"],
    ],
)
def test_usage_errors_exit_2_with_one_line(argv, checkpoint, images, capsys):
    (checkpoint.parent / "not_a_checkpoint.ckpt").write_text("plain text")
    argv = [a.replace("DIR", str(checkpoint.parent)).replace("CKPT", str(checkpoint)) for a in argv]
    assert main(["predict", *images, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vit predict: error: ") and "\n" not in err


def test_a_headless_model_is_refused_naming_its_file(images, tmp_path, capsys):
    backbone = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    path = vit.save_safetensors(backbone, tmp_path / "backbone.safetensors")
    assert main(["predict", *images, "-c", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"vit predict: error: {path}: the model has no classification head (num_classes=0)"


@pytest.mark.parametrize("option", [["--topk", "0"], ["--format", "xml"], ["--batch-size", "-1"]])
def test_bad_options_exit_2(option, checkpoint, images):
    with pytest.raises(SystemExit) as exit_:
        main(["predict", *images, "-c", str(checkpoint), *option])
    assert exit_.value.code == 2


@pytest.mark.parametrize(
    "option, message",
    [
        (["--batch-size", "abc"], "argument --batch-size: expected an integer of at least 1, got 'abc'"),
        (["--topk", "0"], "argument --topk: expected an integer of at least 1, got '0'"),
        (["--num-workers", "-1"], "argument --num-workers: expected an integer of at least 0, got '-1'"),
    ],
)
def test_a_bad_number_is_named_by_its_option(option, message, checkpoint, images, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["predict", *images, "-c", str(checkpoint), *option])
    assert exit_.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == f"vit predict: error: {message}"


def test_an_unknown_command_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["foo"])
    choices = capsys.readouterr().err.split("choose from", 1)[1]
    assert exit_.value.code == 2
    assert all(c in choices for c in ("fit", "validate", "test", "predict", "attention", "export", "models"))


def test_version_is_the_packages(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"vit {vit.__version__}\n"


def test_exit_status_is_0_when_every_input_was_classified(checkpoint, images, capsys):
    assert main(["predict", *images, "-c", str(checkpoint), "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_a_bad_checkpoint_prints_no_traceback(tmp_path, images):
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 100)
    command = [sys.executable, "-m", "vit.cli", "predict", *images, "-c", str(tmp_path / "broken.safetensors")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "broken.safetensors" in done.stderr


def test_urls_are_shown_as_given_and_refused_while_the_others_are_classified(checkpoint, images, capsys):
    urls = ["https://example.com/cat.jpg", "file:///tmp/x.png"]
    assert main(["predict", *urls, *images, "-c", str(checkpoint), "--format", "json"]) == 1
    results = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in results] == [*urls, *images]
    assert all(r["error"] == "URLs are not read as images: download the file first" for r in results[:2])
    assert all(map(classified, results[2:]))


def test_predictor_refuses_an_empty_path_rather_than_reading_the_current_folder(predictor):
    with pytest.raises(ValueError, match="empty string"):
        predictor.predict("")


@pytest.mark.parametrize("command", ["predict", "attention"])
def test_an_empty_source_is_a_usage_error_not_the_current_folder(command, checkpoint, images, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(images[0]).parent)  # images here: '' read as '.' would find and classify them
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                command,
                "",
                "-c",
                str(checkpoint),
                *(["--out", str(tmp_path / "map.png")] if command == "attention" else []),
            ]
        )
    assert exit_.value.code == 2


@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_output_into_a_pipe_closed_early_ends_quietly_with_the_sigpipe_status(fmt, checkpoint, tmp_path):
    Image.fromarray(smooth_rgb(8, 8)).save(tmp_path / "a.png")
    many = [str(tmp_path / "a.png")] * 600  # output well beyond a pipe's buffer, so the writer is still writing
    command = [sys.executable, "-m", "vit.cli", "predict", *many, "-c", str(checkpoint), "--format", fmt, "-q"]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        first = child.stdout.readline()  # what `vit predict ... | head -1` reads
        child.stdout.close()
        err = child.stderr.read()
        status = child.wait(timeout=120)
    assert first.strip() and err == "" and status == 141  # 128 + SIGPIPE, as a tool killed by SIGPIPE reports


def test_attention_into_a_folder_it_cannot_write_is_one_line_naming_the_file(checkpoint, images, tmp_path, capsys,
                                                                          monkeypatch):  # fmt: skip
    import errno
    import os

    from matplotlib.figure import Figure

    def read_only(self, fname, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(fname))

    monkeypatch.setattr(Figure, "savefig", read_only)
    out = tmp_path / "map.png"
    assert main(["attention", images[0], "-c", str(checkpoint), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"vit attention: error: {out}: could not write it (Read-only file system)\n"


def test_ctrl_c_while_the_table_is_written_says_the_output_is_incomplete_not_unwritten(
    checkpoint, images, capsys, monkeypatch
):
    import io

    class StoppedMidTable(io.StringIO):
        def writelines(self, lines):  # the table goes out line by line: Ctrl-C after its first line
            self.write(next(iter(lines)))
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdout", StoppedMidTable())
    assert main(["predict", *images, "-c", str(checkpoint), "-q"]) == 130
    assert sys.stdout.getvalue()  # part of the table is out
    err = capsys.readouterr().err
    assert err == f"vit predict: stopped by Ctrl-C after {len(images)} inputs: the output is incomplete\n"


@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_output_onto_a_full_disk_is_one_line_and_status_1_not_a_traceback(fmt, checkpoint, tmp_path):
    import resource
    import signal

    Image.fromarray(smooth_rgb(8, 8)).save(tmp_path / "a.png")
    many = [str(tmp_path / "a.png")] * 600  # output well beyond the limit below

    def file_size_limit():  # `ulimit -f`: a write past 20 kB fails with EFBIG, as one onto a full disk does
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    # no loader workers: the limit would also refuse the shared-memory files that hand their batches over
    command = [sys.executable, "-m", "vit.cli", "predict", *many, "-c", str(checkpoint), "--format", fmt, "-q"]
    command += ["--num-workers", "0"]
    with open(tmp_path / f"out.{fmt}", "w") as out:
        done = subprocess.run(
            command, cwd=ROOT, stdout=out, stderr=subprocess.PIPE, text=True, preexec_fn=file_size_limit
        )
    assert done.returncode == 1
    assert re.fullmatch(
        r"vit predict: error: cannot write the output \(File too large\); stopped after \d+ inputs: the output is "
        r"incomplete\n",
        done.stderr,
    )


def test_model_option_names_the_variant_of_plain_timm_weights_and_gives_timms_probabilities(tmp_path, capsys):
    reference = write_timm_state_dict(tmp_path / "timm_tiny.safetensors")
    Image.fromarray(smooth_rgb(60, 80)).save(tmp_path / "x.png")
    x = create_transform(**resolve_data_config(model=reference))(Image.open(tmp_path / "x.png").convert("RGB"))
    with torch.no_grad():
        probs, classes = reference(x[None]).softmax(-1)[0].topk(3)
    argv = [str(tmp_path / "x.png"), "-c", str(tmp_path / "timm_tiny.safetensors")]
    assert main(["predict", *argv, "--format", "json"]) == 2
    assert "--model NAME" in capsys.readouterr().err
    assert main(["predict", *argv, "--model", "vit_tiny_patch16_224", "--format", "json", "--topk", "3"]) == 0
    got = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert [p["index"] for p in got] == classes.tolist()
    assert [p["prob"] for p in got] == pytest.approx(probs.tolist(), abs=1e-6)
    out = str(tmp_path / "map.png")
    assert main(["attention", *argv, "--model", "vit_tiny_patch16_224", "--out", out]) == 0
    assert f"predicted: {classes[0]} (class {classes[0]}, p={probs[0]:.3f})" in capsys.readouterr().out


def test_model_option_gives_way_with_a_warning_to_the_files_own_config(checkpoint, images, capsys):
    assert main(["predict", *images, "-c", str(checkpoint), "--model", "vit_tiny_patch16_224", "-q"]) == 0
    out, err = capsys.readouterr()
    assert (
        err == f"vit predict: warning: {checkpoint}: the file's own model config is used, not 'vit_tiny_patch16_224'\n"
    )
    assert any(name in out for name in CLASS_NAMES)  # the tiny model's own classes


# ---------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_384"])
def test_models_lists_timm_parameter_counts_and_input_sizes(name, capsys):
    assert main(["models", name]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if name in line).split()
    timm_params = sum(p.numel() for p in timm.create_model(name).parameters())
    size = name.rsplit("_", 1)[1]
    assert row[1] == f"{timm_params / 1e6:.1f}M" and row[2] == f"{size}x{size}"


def test_models_shows_timms_default_pretrained_tag_or_a_dash_where_timm_has_no_weights(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 100
    shown = {line.split()[0]: line.split()[-1] for line in lines if line.strip().startswith("vit_")}
    assert sorted(shown) == vit.list_models()
    with_weights = timm.list_pretrained()  # every tag timm has weights for
    for name, tag in shown.items():
        tags = [t for t in with_weights if t.split(".", 1)[0] == name]
        assert tag == (timm.models.get_pretrained_cfg(name).tag if tags else "-")
        assert tag == "-" or f"{name}.{tag}" in tags
    assert shown["vit_nano_patch4_32"] == "-" and not timm.is_model("vit_nano_patch4_32")  # a name of our own
    assert shown["vit_base_patch16_224"] != "-"


def test_models_names_timms_vits_for_a_pattern_no_variant_of_ours_matches(capsys):
    assert main(["models", "deit3*"]) == 0
    out = capsys.readouterr().out
    assert f"{len(timm.list_models('deit3*'))} of timm's ViT names do" in out and "deit3_base_patch16_224" in out
    vit.create_model("deit3_base_patch16_224", depth=1)  # as it says: the name works


def test_models_with_no_match_is_a_usage_error(capsys):
    assert main(["models", "resnet*"]) == 2
    assert "resnet" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- benchmark
def test_benchmark_runs_in_quick_mode():
    command = [
        sys.executable,
        "benchmarks/predict.py",
        "--quick",
        "--synthetic",
        "--amp",
        "--jpeg-size",
        "300",
        "200",
    ]  # tests never read shared data
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ratio" in done.stdout and "images/s" in done.stdout and "Predictor(amp=True)" in done.stdout
    assert "JPEGs of 300x200 px" in done.stdout


# ------------------------------------------------------------------------------------------ half precision
def _probs(result: dict) -> dict[int, float]:
    return {p["index"]: p["prob"] for p in result["predictions"]}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_amp_runs_the_model_in_half_precision_with_nearly_the_same_probabilities(dtype, tmp_path, monkeypatch):
    import vit.precision

    monkeypatch.setattr(vit.precision, "matmul_speedup", lambda dtype: 2.0)  # as on a CPU with AMX: no warning
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.roll(smooth_rgb(40, 60), 9 * i, axis=1)).save(paths[-1])
    model = tiny_model()
    seen = []
    model.blocks[0].mlp.fc1.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    full = Predictor(model, class_names=CLASS_NAMES, num_workers=0).predict(paths, topk=len(CLASS_NAMES))
    half = Predictor(model, class_names=CLASS_NAMES, num_workers=0, amp=True, amp_dtype=dtype)
    halved = half.predict(paths, topk=len(CLASS_NAMES))
    assert seen == [torch.float32, dtype]  # one batch each
    for a, b in zip(full, halved):
        p, q = _probs(a), _probs(b)
        assert max(abs(p[i] - q[i]) for i in p) < 0.01
    assert any(_probs(a) != _probs(b) for a, b in zip(full, halved))  # half precision did change something


def test_amp_warns_where_this_cpu_multiplies_half_precision_slowly(monkeypatch):
    import vit.precision

    monkeypatch.setattr(vit.precision, "matmul_speedup", lambda dtype: 0.25)
    with pytest.warns(UserWarning, match=r"amp makes prediction slower here: a bfloat16 matrix product ran 4\.0 "):
        Predictor(tiny_model(), amp=True)
    monkeypatch.setattr(vit.precision, "matmul_speedup", lambda dtype: pytest.fail("probed without amp"))
    Predictor(tiny_model())


def test_amp_option_reaches_the_model(checkpoint, images, capsys, monkeypatch):
    import vit.precision

    monkeypatch.setattr(vit.precision, "matmul_speedup", lambda dtype: 2.0)
    runs = {}
    for name, extra in (("full", []), ("half", ["--amp", "--amp-dtype", "bfloat16"])):
        assert main(["predict", *images, "-c", str(checkpoint), "--format", "json", "--topk", "5", *extra]) == 0
        runs[name] = [_probs(r) for r in json.loads(capsys.readouterr().out)]
    assert runs["full"] != runs["half"]
    for p, q in zip(runs["full"], runs["half"]):
        assert max(abs(p[i] - q[i]) for i in p.keys() & q.keys()) < 0.01


@pytest.mark.parametrize("amp", [["--amp"], ["--amp-dtype", "bfloat16"]])  # naming the type implies --amp
def test_amp_warning_is_one_line_on_the_command_line(checkpoint, images, capsys, monkeypatch, amp):
    import vit.precision

    monkeypatch.setattr(vit.precision, "matmul_speedup", lambda dtype: 0.25)
    assert main(["predict", images[0], "-c", str(checkpoint), *amp, "--format", "json"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "vit predict: warning: amp makes prediction slower here: a bfloat16 matrix product ran 4.0 times slower "
        "than a float32 one on this CPU (bfloat16 is fast only on CPUs with AMX); predict without it"
    ]


def test_amp_in_a_type_the_gpu_lacks_is_refused_before_any_image_is_read(monkeypatch):
    from vit.predict import _check_autocast

    # torch's own check, on a GPU without bfloat16 (a T4): only the capability queries are faked, as no GPU is here
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    with pytest.raises(ValueError, match="amp in bfloat16 on cuda: Current CUDA Device does not support bfloat16"):
        _check_autocast("cuda", torch.bfloat16)
    _check_autocast("cuda", torch.float16)
    _check_autocast("cpu", torch.bfloat16)


def test_predictor_checks_the_amp_type_only_when_amp_is_on(monkeypatch):
    import vit.precision
    import vit.predict

    monkeypatch.setattr(vit.precision, "matmul_speedup", lambda dtype: 2.0)
    checked = []
    monkeypatch.setattr(vit.predict, "_check_autocast", lambda device_type, dtype: checked.append((device_type, dtype)))
    Predictor(tiny_model())
    Predictor(tiny_model(), amp=True, amp_dtype=torch.float16)
    assert checked == [("cpu", torch.float16)]
