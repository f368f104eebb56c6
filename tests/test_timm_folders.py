"""A timm name builds with timm's preprocessing for it (timm itself is the oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

import vit
from vit.cli import main
from vit.predict import Predictor

DIFFERS = {"mean", "std", "crop_pct"}  # what timm's config of these names sets otherwise than vit's old defaults


def plain(config: dict) -> dict:
    """A data config with lists for tuples, so timm's (from JSON or from its tables) and ours compare."""
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in config.items()}


def photo(path: Path, h: int = 90, w: int = 120) -> Path:
    """A smooth, non-square colour image: the crop fraction and mean/std each change its tensor."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    pixels = np.stack([255 * x / w, 255 * y / h, 127 + 120 * np.sin(x / 9 + y / 13)], -1).round().astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def same_input(timm_config: dict, predictor: Predictor, image: Path) -> None:
    expected = create_transform(**timm_config, is_training=False)(Image.open(image).convert("RGB"))
    torch.testing.assert_close(predictor.preprocess(image), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------------- timm names and tags
TIMM_NAMES = [
    "vit_small_patch16_384",  # a variant of ours too: timm's crop_pct 1.0 (vit's default was 0.9)
    "vit_small_patch8_224",  # ours too; timm's default tag is DINO's: ImageNet mean and std
    "deit3_small_patch16_224",
    "vit_small_patch14_dinov2",
    "vit_base_patch16_clip_224",  # CLIP's mean and std, crop 0.95
    "vit_base_patch16_clip_224.openai_ft_in1k",  # a tag: its own pretrained config (crop 0.9)
]


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_a_timm_name_preprocesses_as_timm_does_for_it(tmp_path, name):
    with torch.device("meta"):  # only its pretrained_cfg is read
        reference = timm.create_model(name, pretrained=False, depth=1, num_classes=3)
    expected = resolve_data_config(model=reference)
    assert DIFFERS & {
        k for k, v in plain(expected).items() if plain(vit.model.default_data_config(vit.ViTConfig()))[k] != v
    }
    model = vit.create_model(name, depth=1, num_classes=3)
    assert plain(resolve_data_config(model=model)) == plain(expected)
    predictor = Predictor(model, num_workers=0)
    assert plain(predictor.data_config) == plain(expected)
    same_input(expected, predictor, photo(tmp_path / "x.png"))


def test_a_variant_of_our_own_keeps_vits_defaults_and_a_new_size_keeps_timms_preprocessing():
    model = vit.create_model("vit_nano_patch4_32")
    assert model.pretrained_cfg == vit.model.default_data_config(model.cfg)
    resized = vit.create_model("vit_small_patch16_384", img_size=256, depth=1)
    assert resized.pretrained_cfg["input_size"] == (3, 256, 256) and resized.pretrained_cfg["crop_pct"] == 1.0
    grey = vit.create_model("deit3_small_patch16_224", in_chans=1, depth=1)  # one channel: the RGB average
    assert grey.pretrained_cfg["mean"] == pytest.approx([sum((0.485, 0.456, 0.406)) / 3])


@pytest.mark.parametrize("name", ["vit_tiny_patch16_384", "deit3_small_patch16_224"])
def test_plain_timm_weights_named_with_model_classify_as_timm_does(tmp_path, capsys, perturb, name):
    reference = perturb(timm.create_model(name, pretrained=False, num_classes=4)).eval()
    save_file(reference.state_dict(), str(tmp_path / "weights.safetensors"))
    image = photo(tmp_path / "x.png")
    x = create_transform(**resolve_data_config(model=reference))(Image.open(image).convert("RGB"))
    with torch.no_grad():
        probs = reference(x[None]).softmax(-1)[0]
    argv = ["predict", str(image), "-c", str(tmp_path / "weights.safetensors"), "--model", name]
    assert main([*argv, "--format", "json", "--topk", "4"]) == 0
    got = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert {p["index"]: p["prob"] for p in got} == pytest.approx(dict(enumerate(probs.tolist())), abs=1e-6)


def test_a_checkpoints_own_preprocessing_wins_over_the_names(tmp_path):
    custom = dict(mean=[0.2, 0.3, 0.4], std=[0.3, 0.2, 0.1], crop_pct=1.0, interpolation="bilinear")
    model = vit.create_model("deit3_small_patch16_224", depth=1, num_classes=3)
    path = vit.save_safetensors(model, tmp_path / "m.safetensors", data_config={**model.pretrained_cfg, **custom})
    loaded = vit.create_model("deit3_small_patch16_224", pretrained=path, depth=1)
    assert {k: loaded.pretrained_cfg[k] for k in custom} == custom
