"""timm users' two ways in: a timm name builds with timm's preprocessing for it, and a timm model folder (as timm's
`save_for_hf` / `push_to_hf_hub` write it, or a Hub download) loads; timm itself is the oracle for both."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, ImageNetInfo, create_transform, resolve_data_config
from timm.models._hub import save_for_hf

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
    assert grey.pretrained_cfg["mean"] == pytest.approx([sum(IMAGENET_DEFAULT_MEAN) / 3])


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


# ------------------------------------------------------------------------------------------ timm folders
LABELS = ["n01", "n02", "n03", "n04", "n05"]
DESCRIPTIONS = {"n01": "tench", "n02": "goldfish", "n03": "shark", "n04": "ray", "n05": "cock"}


def timm_folder(folder: Path, perturb, layout: str = "safetensors") -> torch.nn.Module:
    """A small random timm ViT written by timm's own `save_for_hf` (model_args carry depth and img_size)."""
    reference = timm.create_model("deit3_small_patch16_224", pretrained=False, depth=2, img_size=64, num_classes=5)
    labels = {"label_names": LABELS, "label_descriptions": DESCRIPTIONS}
    save_for_hf(perturb(reference).eval(), folder, safe_serialization=layout != "bin", model_config=labels)
    return reference


def hub_snapshot(folder: Path, root: Path) -> Path:
    """`folder` laid out as the Hugging Face cache keeps a download: snapshot files are links into blobs/."""
    repo = root / "models--timm--deit3_small_patch16_224.fb_in1k"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(folder.iterdir())):
        shutil.copy(file, repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob{i}")
    return snapshot


@pytest.mark.parametrize("layout", ["safetensors", "bin", "hub_cache"])
def test_timm_folder_loads_with_timms_logits_preprocessing_and_labels(tmp_path, perturb, layout):
    folder = tmp_path / "vit_s"
    timm_folder(folder, perturb, layout)
    if layout == "hub_cache":
        folder = hub_snapshot(folder, tmp_path / "hub")
    reference = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()  # timm's own reader of the folder
    model, checkpoint = vit.load_model(folder)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), rtol=0, atol=0)
    assert checkpoint.class_names == [DESCRIPTIONS[n] for n in LABELS]
    predictor = Predictor.from_checkpoint(folder, num_workers=0)
    expected = resolve_data_config(model=reference)
    assert plain(predictor.data_config) == plain(expected) and expected["mean"][0] != 0.5  # DeiT-3's: ImageNet's
    same_input(expected, predictor, photo(tmp_path / "x.png"))


def test_vit_predict_reads_a_timm_folder_and_an_older_flat_config(tmp_path, capsys, perturb):
    folder = tmp_path / "vit_s"
    timm_folder(folder, perturb)
    image = photo(tmp_path / "x.png")
    assert main(["predict", str(image), "-c", str(folder), "--format", "json"]) == 0
    assert {p["label"] for p in json.loads(capsys.readouterr().out)[0]["predictions"]} == set(DESCRIPTIONS.values())
    # Older timm wrote one flat dict, the pretrained config with the architecture in it, and no model_args (nor
    # label names: an ImageNet head gets ImageNet's, as from timm's inference script and from a timm tag).
    flat = tmp_path / "flat"
    reference = perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False)).eval()
    save_for_hf(reference, flat, safe_serialization=True)
    config = json.loads((flat / "config.json").read_text())
    (flat / "config.json").write_text(json.dumps({"architecture": config["architecture"], **config["pretrained_cfg"]}))
    model, checkpoint = vit.load_model(flat)
    assert checkpoint.class_names == ImageNetInfo("imagenet-1k").label_descriptions(as_dict=False)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "edit, problem",
    [
        (
            {"architecture": "resnet18", "model_args": {"num_classes": 5}},
            r"config\.json \(resnet18\): timm's model uses the ResNet class",
        ),
        ({"architecture": "no_such_net"}, r"config\.json: architecture 'no_such_net' is not a model timm .* knows"),
        ({"model_args": {"depth": 2, "img_size": 64, "no_such_arg": 1}}, r"config\.json: timm cannot build"),
        ({"model_args": [2]}, r"config\.json: model_args is not a JSON object"),
        ({"label_names": ["a", "b"]}, r"config\.json: label_names is not a list of 5 names"),
        ({"pretrained_cfg": {"mean": "grey"}}, r"config\.json: mean 'grey' is not 3 numbers"),
    ],
)
def test_broken_timm_folder_is_one_line_naming_the_problem(tmp_path, perturb, edit, problem):
    timm_folder(tmp_path, perturb)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(vit.CheckpointError) as err:
        vit.read_checkpoint(tmp_path)
    assert re.match(re.escape(str(tmp_path)) + "/" + problem, str(err.value)), str(err.value)
    assert "\n" not in str(err.value)


def test_timm_folder_without_weights_says_what_it_needs(tmp_path, perturb):
    timm_folder(tmp_path, perturb)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(vit.CheckpointError, match=r"a timm model folder needs model\.safetensors or pytorch_model"):
        vit.read_checkpoint(tmp_path)
