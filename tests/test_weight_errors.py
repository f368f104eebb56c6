"""Weights that are the wrong file: each error is one line that names the file and says what it is instead."""

from __future__ import annotations

import re
import warnings

import pytest
import timm
import torch
import transformers
from safetensors.torch import save_file

import vit

HF_SMALL = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
)


def test_an_onnx_file_given_as_weights_says_it_is_onnx(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x09\x12\x07pytorch")  # what `vit export --format onnx` writes starts like this
    with pytest.raises(vit.CheckpointError) as err:
        vit.read_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{path}: an ONNX model") and ".safetensors" in message and "\n" not in message


def test_a_torch_checkpoint_cut_short_says_so_in_one_sentence(tmp_path):
    whole = tmp_path / "whole.pth"
    torch.save(vit.create_model("vit_tiny_patch16_224", depth=1).state_dict(), whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # an interrupted copy or download
    with pytest.raises(vit.CheckpointError) as err:
        vit.read_checkpoint(cut)
    message = str(err.value)
    assert message.startswith(f"{cut}: a PyTorch checkpoint that is cut short or damaged"), message
    assert "miniz" not in message and "\n" not in message  # not torch's advice, cut off mid-sentence


@pytest.mark.parametrize(
    "make",
    [
        lambda: transformers.Dinov2Model(transformers.Dinov2Config(**HF_SMALL)),
        lambda: transformers.DeiTForImageClassification(transformers.DeiTConfig(**HF_SMALL, num_labels=3)),
    ],
    ids=["dinov2", "deit"],
)
def test_a_hugging_face_folder_of_another_model_type_names_the_type(tmp_path, make):
    model = make()
    model.save_pretrained(tmp_path)
    with pytest.raises(vit.CheckpointError) as err:
        vit.read_checkpoint(tmp_path)
    expected = f"{tmp_path / 'config.json'}: model_type '{model.config.model_type}' is not a ViT this reads"
    assert str(err.value).startswith(expected), str(err.value)


def test_hugging_face_vit_encoders_under_other_model_types_still_load(tmp_path, batch_for):
    """MSN's classifier is a ViT under model_type 'vit_msn': it loads and gives transformers' logits."""
    torch.manual_seed(0)
    reference = transformers.ViTMSNForImageClassification(transformers.ViTMSNConfig(**HF_SMALL, num_labels=3))
    reference.save_pretrained(tmp_path)
    model, _ = vit.load_model(tmp_path)
    x = batch_for(model)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), reference.eval()(pixel_values=x).logits, atol=1e-5)


def test_a_checkpoint_of_another_width_says_both_widths_before_the_keys(tmp_path):
    path = tmp_path / "small.safetensors"
    save_file(timm.create_model("vit_small_patch16_224", depth=2).state_dict(), str(path))
    with pytest.raises(vit.CheckpointError) as err:
        vit.create_model("vit_tiny_patch16_224", pretrained=path, depth=2)
    assert re.match(
        rf"{re.escape(str(path))} does not fit the model \(the checkpoint: width 384, depth 2; the model: width 192, "
        r"depth 2\); mis-shaped: ",
        str(err.value),
    ), str(err.value)
    with pytest.raises(
        vit.CheckpointError, match=r"\(the checkpoint: width 384, depth 2; the model: width 384, depth 3"
    ):
        vit.create_model("vit_small_patch16_224", pretrained=path, depth=3)


def test_a_checkpoint_that_does_not_fit_gets_its_error_without_a_note_about_its_head(tmp_path):
    path = tmp_path / "small.safetensors"
    save_file(timm.create_model("vit_small_patch16_224", depth=2, num_classes=10).state_dict(), str(path))
    with warnings.catch_warnings(record=True) as caught, pytest.raises(vit.CheckpointError, match="does not fit"):
        warnings.simplefilter("always")
        vit.create_model("vit_tiny_patch16_224", pretrained=path, depth=2, num_classes=5)
    assert [str(w.message) for w in caught if "head" in str(w.message)] == []
    with pytest.warns(UserWarning, match=r"head \(10 classes\) does not fit the model's \(5 classes\)"):
        vit.create_model("vit_small_patch16_224", pretrained=path, depth=2, num_classes=5)  # fits but for its head


@pytest.mark.parametrize("content", [b"hello, I am notes\n", b"\x89PNG\r\n\x1a\n not really"])
def test_a_file_that_is_no_checkpoint_at_all_says_so_without_the_unpicklers_noise(tmp_path, content):
    path = tmp_path / "weights.ckpt"
    path.write_bytes(content)
    with pytest.raises(vit.CheckpointError) as err:
        vit.read_checkpoint(path)
    assert str(err.value) == f"{path}: not a readable PyTorch checkpoint (nor a .safetensors or .npz file, nor a " + (
        "Hugging Face folder)"
    )


@pytest.mark.parametrize(
    "layout",
    [dict(no_embed_class=True), dict(class_token=False, global_pool="avg"), dict(reg_tokens=4, no_embed_class=True)],
)
def test_a_checkpoint_with_other_prefix_tokens_names_them_instead_of_failing_a_reshape(tmp_path, layout):
    # DeiT-3, GAP and register checkpoints given for a class-token model: timm's resampler raised a RuntimeError
    from timm.models.vision_transformer import VisionTransformer

    small = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5)
    path = tmp_path / "other_layout.safetensors"
    save_file(VisionTransformer(**small, **layout).state_dict(), str(path))
    model = vit.VisionTransformer(vit.ViTConfig(**small))
    with pytest.raises(vit.CheckpointError, match=r"other_layout\.safetensors: its pos_embed has \d+ positions") as e:
        vit.load_pretrained(model, path)
    assert "\n" not in str(e.value) and "class_token=True, reg_tokens=0, no_embed_class=False" in str(e.value)
