"""Checkpoints in every format, checked against the library that wrote them: timm, transformers, timm's JAX loader."""

from __future__ import annotations

import importlib
import io
import pickle
import re
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

import vit

NAME, SMALL = "vit_tiny_patch16_224", dict(depth=2)
TOL = 1e-5


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture
def timm_file(tmp_path, tiny_pair) -> tuple[torch.nn.Module, Path]:
    """(a two-block timm vit_tiny_patch16_224, its weights as a timm .safetensors file)."""
    reference, _ = tiny_pair
    path = tmp_path / "timm_tiny.safetensors"
    save_file(reference.state_dict(), str(path))
    return reference, path


# ------------------------------------------------------------------------- timm architectures by name
# timm ViTs without a variant of ours, each with flags no key of the state dict reveals (eps, activation, pooling,
# where the position embeddings start), cut to one block: ours builds them from timm's own config.
TIMM_ARCHITECTURES = [
    "deit3_small_patch16_224",  # no_embed_class, LayerScale
    "vit_small_patch14_reg4_dinov2",  # register tokens, 518 px
    "vit_base_patch16_clip_quickgelu_224",  # pre_norm, eps 1e-5, quick_gelu
    "vit_base_patch32_siglip_gap_256",  # no class token, average pooling without fc_norm, gelu_tanh
    "vit_medium_patch16_gap_256",  # qkv_bias=False
    "eva_large_patch14_196",  # average pooling with fc_norm
]


@pytest.mark.parametrize("name", TIMM_ARCHITECTURES)
def test_timm_architectures_load_by_timms_name_with_timms_logits(tmp_path, perturb, batch_for, name):
    reference = perturb(timm.create_model(name, depth=1)).eval()
    path = tmp_path / f"{name}.safetensors"
    save_file(reference.state_dict(), str(path))
    model = vit.create_model(name, pretrained=path, depth=1)
    x = batch_for(reference, batch=1)
    torch.testing.assert_close(logits(model, x), logits(reference, x), rtol=0, atol=TOL)


@pytest.mark.parametrize(
    "name, feature",
    [
        ("vit_base_patch16_siglip_224", "attention pooling (global_pool='map')"),
        ("vit_base_patch16_xp_224", "ParallelScalingBlock blocks"),
        ("vit_small_patch14_dinov2", None),  # computes as ours: no error
        ("vit_giant_patch14_dinov2", "GluMlp layer"),
        ("vit_base_r50_s16_224", "HybridEmbed patch embedding"),
        ("vit_large_patch16_radio_v3", "no final norm (final_norm=False)"),
        ("deit_tiny_distilled_patch16_224", "VisionTransformerDistilled class"),
        ("eva02_tiny_patch14_224", "the Eva class"),
    ],
)
def test_timm_architectures_ours_does_not_compute_are_refused_naming_the_feature(name, feature):
    if feature is None:
        assert vit.model_config(name).init_values
        return
    with pytest.raises(vit.CheckpointError, match=rf"^{name}: timm's model uses .*{re.escape(feature)}") as err:
        vit.model_config(name)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------- timm files
@pytest.mark.parametrize("prefix", ["", "module.", "model."])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_files_load_with_or_without_wrapper_prefixes(tmp_path, tiny_pair, batch_for, prefix, suffix):
    reference, _ = tiny_pair
    state = {prefix + k: v for k, v in reference.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": state, "epoch": 3}, path)  # as training scripts write them
    else:
        save_file(state, str(path))
    model = vit.create_model(NAME, pretrained=path, **SMALL)
    x = batch_for(model)
    torch.testing.assert_close(logits(model, x), logits(reference, x), rtol=0, atol=TOL)


def test_local_checkpoint_keeps_its_head_unless_another_class_count_is_asked(timm_file, batch_for):
    reference, path = timm_file
    kept = vit.create_model(NAME, pretrained=path, **SMALL)
    assert kept.num_classes == 1000 and torch.equal(kept.head.weight, reference.head.weight)
    with pytest.warns(UserWarning, match=r"head \(1000 classes\) does not fit the model's \(10 classes\)"):
        reset = vit.create_model(NAME, pretrained=path, num_classes=10, **SMALL)
    x = batch_for(reset)
    assert logits(reset, x).shape == (2, 10)
    with torch.no_grad():
        torch.testing.assert_close(reset.eval().forward_features(x), reference.forward_features(x), rtol=0, atol=TOL)


def test_headless_backbone_loads_into_a_model_with_a_head(tmp_path, tiny_pair):
    reference, _ = tiny_pair
    path = tmp_path / "backbone.safetensors"
    save_file({k: v for k, v in reference.state_dict().items() if not k.startswith("head.")}, str(path))
    assert vit.create_model(NAME, pretrained=path, **SMALL).num_classes == 0  # num_classes=None: as the file
    with pytest.warns(UserWarning, match="new head needs training"):
        model = vit.create_model(NAME, pretrained=path, num_classes=5, **SMALL)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, reference.blocks[1].mlp.fc2.weight)


def test_same_size_checkpoint_loads_bit_exact(timm_file):
    reference, path = timm_file
    model = vit.create_model(NAME, **SMALL)
    vit.load_pretrained(model, path)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# ------------------------------------------------------------------------------------------- resampling
RESAMPLE_CASES = {  # (our name, overrides): timm's own loader (checkpoint_filter_fn, load_pretrained) is the oracle
    "224_to_384": ("vit_tiny_patch16_384", {}),
    "patch16_to_patch32": (NAME, {"patch_size": 32}),
    "rgb_to_grey": (NAME, {"in_chans": 1}),
}


@pytest.mark.parametrize("case", RESAMPLE_CASES)
def test_checkpoint_resamples_to_another_grid_patch_or_channels_like_timm(timm_file, batch_for, case):
    _, path = timm_file
    name, overrides = RESAMPLE_CASES[case]
    expected = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **SMALL, **overrides
    )
    model = vit.create_model(name, pretrained=path, **SMALL, **overrides)
    assert model.pos_embed.shape == expected.pos_embed.shape
    x = batch_for(model)
    torch.testing.assert_close(logits(model, x), logits(expected, x), rtol=0, atol=TOL)


# -------------------------------------------------------------------------------------- Hugging Face
def hf_vit(perturb, cls=transformers.ViTForImageClassification, **config):
    """A small randomly initialised Hugging Face ViT shaped like two blocks of vit_tiny at 64 px."""
    config = {**dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768,
                     image_size=64, patch_size=16, num_labels=4), **config}  # fmt: skip
    return perturb(cls(transformers.ViTConfig(**config))).eval()


def test_hugging_face_folder_gives_hugging_face_logits(tmp_path, perturb):
    hf = hf_vit(perturb, id2label={0: "cat", 1: "dog", 2: "eel", 3: "fox"})
    hf.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
    built, checkpoint = vit.load_model(tmp_path)
    named = vit.create_model(NAME, pretrained=tmp_path, img_size=64, **SMALL)
    for model in (built, named):
        torch.testing.assert_close(logits(model, x), expected, rtol=0, atol=1e-4)
        assert model.cfg.norm_eps == 1e-12
    assert checkpoint.class_names == ["cat", "dog", "eel", "fox"]


@pytest.mark.parametrize(
    "config", [dict(hidden_act="relu"), dict(hidden_act="silu"), dict(hidden_act="gelu_new"), dict(patch_size=[16, 16])]
)
def test_hugging_face_configs_ours_computes_give_hugging_face_logits(tmp_path, perturb, config):
    hf = hf_vit(perturb, **config)
    hf.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
    model, _ = vit.load_model(tmp_path)
    torch.testing.assert_close(logits(model, x), expected, rtol=0, atol=1e-4)


def test_hugging_face_vit_model_without_head_gives_its_hidden_states(tmp_path, perturb):
    hf = hf_vit(perturb, cls=transformers.ViTModel)  # has a pooler, which timm's layout has no place for
    hf.save_pretrained(tmp_path)
    model, _ = vit.load_model(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = hf(pixel_values=x).last_hidden_state
        torch.testing.assert_close(model.eval().forward_features(x), expected, rtol=0, atol=1e-4)
    assert model.num_classes == 0


def test_hugging_face_layer_norm_eps_is_honoured(tmp_path, perturb):
    hf = hf_vit(perturb, layer_norm_eps=0.05)  # large enough to matter at these activation scales
    hf.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
    model, _ = vit.load_model(tmp_path)
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {0.05}
    torch.testing.assert_close(logits(model, x), expected, rtol=0, atol=1e-4)
    ignoring_eps = vit.VisionTransformer(vit.ViTConfig(**{**model.cfg.to_dict(), "norm_eps": 1e-6}))
    ignoring_eps.load_state_dict(model.state_dict())
    assert (logits(ignoring_eps, x) - expected).abs().max() > 1e-3  # so the check above can fail


NORM = dict(image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
HF_PROCESSORS = {  # (transformers class, settings saved with the folder, atol)
    # the PIL backend (transformers 4's ViTImageProcessor) resizes with Pillow, as timm does: equal but for float32
    "pil_bicubic": ("ViTImageProcessorPil", dict(resample=3, **NORM), 1e-6),
    "pil_nearest_raw": ("ViTImageProcessorPil", dict(resample=0, do_normalize=False, rescale_factor=0.01), 1e-6),
    "pil_no_rescale": ("ViTImageProcessorPil", dict(do_rescale=False, image_mean=[120] * 3, image_std=[60] * 3), 1e-5),
    # transformers 5's default backend resizes uint8 tensors with torchvision, whose antialiased bilinear kernel
    # rounds differently from Pillow's on a few per cent of values: at most one 8-bit level, 1 / 255 / std
    "torchvision_bilinear": ("ViTImageProcessor", dict(resample=2, **NORM), 1 / 255 / 0.2 + 1e-6),
}  # fmt: skip


@pytest.mark.parametrize("case", HF_PROCESSORS)
def test_hugging_face_folder_preprocesses_as_its_image_processor(tmp_path, perturb, case):
    processor_class, settings, atol = HF_PROCESSORS[case]
    hf_vit(perturb).save_pretrained(tmp_path)
    transformers.ViTImageProcessor(size={"height": 64, "width": 64}, **settings).save_pretrained(tmp_path)
    rng = np.random.default_rng(0)  # non-square noise: a crop, a kept aspect ratio or another kernel all show
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 90), (123, 47))]
    expected = getattr(transformers, processor_class).from_pretrained(tmp_path)(images, return_tensors="pt")
    predictor = vit.Predictor.from_checkpoint(tmp_path)
    ours = torch.stack([predictor.preprocess(image) for image in images])
    torch.testing.assert_close(ours, expected.pixel_values, rtol=0, atol=atol)


def test_hugging_face_processor_settings_we_cannot_mirror_warn_and_fall_back(tmp_path, perturb):
    hf_vit(perturb).save_pretrained(tmp_path)
    processor = tmp_path / "preprocessor_config.json"
    processor.write_text('{"do_resize": false, "resample": 9, "image_mean": 0.5, "image_std": 0.25}')
    with pytest.warns(UserWarning) as record:
        checkpoint = vit.read_checkpoint(tmp_path)
    assert [str(w.message) for w in record] == [
        f"{processor}: cannot mirror do_resize false, resample 9; using a 64x64 bilinear resize instead"
    ]
    assert checkpoint.data_config == {"input_size": (3, 64, 64), "interpolation": "bilinear", "crop_pct": 1.0,
                                      "crop_mode": "squash", "mean": (0.5,) * 3, "std": (0.25,) * 3}  # fmt: skip
    for broken, problem in (("{", "not valid JSON"), ('{"image_mean": "grey"}', "image_mean 'grey' is not 3 numbers")):
        processor.write_text(broken)  # a broken file is an error, as a broken config.json is
        with pytest.raises(vit.CheckpointError, match=rf"^{re.escape(str(processor))}: {problem}"):
            vit.read_checkpoint(tmp_path)


@pytest.mark.parametrize("layout", ["files", "transformers5_modules"])
@pytest.mark.parametrize("suffix", [".bin", ".pth"])
def test_hugging_face_state_dict_file_loads_into_a_matching_model(tmp_path, perturb, layout, suffix):
    hf = hf_vit(perturb)
    if layout == "files":  # the names on disk (transformers 4, and 5's save_pretrained)
        hf.save_pretrained(tmp_path / "hf")
        state = load_file(tmp_path / "hf" / "model.safetensors")
        assert any(".attention.attention.query." in k for k in state)
    else:
        state = hf.state_dict()
        assert any(".attention.q_proj." in k for k in state)
    torch.save(state, tmp_path / f"hf{suffix}")
    model = vit.create_model(NAME, img_size=64, num_classes=4, norm_eps=1e-12, **SMALL)
    vit.load_pretrained(model, tmp_path / f"hf{suffix}")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, x), hf(pixel_values=x).logits, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------- JAX
def export_jax_npz(model: torch.nn.Module, path: Path, layout: str) -> None:
    """timm weights -> the original vit_jax .npz layout (one group per block), or big_vision's (`params/`,
    blocks stacked on a leading axis): the inverse of timm's `_load_weights`."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    dim, heads = model.embed_dim, model.blocks[0].attn.num_heads
    big_vision = layout == "big_vision"
    prefix, (mha, mlp, ln2) = ("params/", (0, 0, 1)) if big_vision else ("", (1, 3, 2))
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    blocks = []
    for i in range(len(model.blocks)):
        b, a = f"blocks.{i}.", f"MultiHeadDotProductAttention_{mha}/"
        qkv_w, qkv_b = np.split(sd[b + "attn.qkv.weight"], 3), np.split(sd[b + "attn.qkv.bias"], 3)
        block = {
            "LayerNorm_0/scale": sd[b + "norm1.weight"],
            "LayerNorm_0/bias": sd[b + "norm1.bias"],
            f"LayerNorm_{ln2}/scale": sd[b + "norm2.weight"],
            f"LayerNorm_{ln2}/bias": sd[b + "norm2.bias"],
            a + "out/kernel": sd[b + "attn.proj.weight"].T.reshape(heads, dim // heads, dim),
            a + "out/bias": sd[b + "attn.proj.bias"],
        }
        for n, wt, bias in zip(("query", "key", "value"), qkv_w, qkv_b):
            block[a + f"{n}/kernel"] = wt.T.reshape(dim, heads, dim // heads)
            block[a + f"{n}/bias"] = bias.reshape(heads, dim // heads)
        for r in (0, 1):
            block[f"MlpBlock_{mlp}/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            block[f"MlpBlock_{mlp}/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
        blocks.append(block)
        if not big_vision:
            w.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in block.items()})
    if big_vision:
        w.update({f"Transformer/encoderblock/{k}": np.stack([blk[k] for blk in blocks]) for k in blocks[0]})
    np.savez(path, **{prefix + k: v for k, v in w.items()})


@pytest.mark.parametrize("layout", ["vit_jax", "big_vision"])
def test_jax_npz_loads_in_timm_and_ours_with_the_original_logits(tmp_path, tiny_pair, batch_for, layout):
    reference, _ = tiny_pair
    path = tmp_path / "ViT-Ti_16.npz"
    export_jax_npz(reference, path, layout)
    x = batch_for(reference)
    expected = logits(reference, x)

    timm_loaded = timm.create_model(NAME, **SMALL)
    timm_loaded.load_pretrained(str(path))  # timm's own .npz loader: checks the exporter
    torch.testing.assert_close(logits(timm_loaded, x), expected, rtol=0, atol=TOL)
    ours = vit.create_model(NAME, pretrained=path, **SMALL)
    torch.testing.assert_close(logits(ours, x), expected, rtol=0, atol=TOL)


def test_jax_npz_missing_an_array_names_it(tmp_path, tiny_pair):
    path = tmp_path / "cut.npz"
    export_jax_npz(tiny_pair[0], path, "vit_jax")
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files if "encoderblock_1/MlpBlock_3/Dense_0/bias" not in k}
    np.savez(path, **arrays)
    with pytest.raises(vit.CheckpointError, match=r"cut\.npz.*'Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias'"):
        vit.read_checkpoint(path)


# ------------------------------------------------------------------------------ our files and .ckpt
def test_safetensors_round_trip_keeps_config_class_names_and_preprocessing(tmp_path, batch_for):
    model = vit.create_model("vit_nano_patch4_32", num_classes=3, qk_norm=True, init_values=0.1).eval()
    data_config = {"input_size": [3, 32, 32], "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.2, 0.2],
                   "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}  # fmt: skip
    path = vit.save_safetensors(model, tmp_path / "nano.safetensors", class_names=["a", "b", "c"],
                                data_config=data_config)  # fmt: skip
    loaded, checkpoint = vit.load_model(path)
    assert loaded.cfg == model.cfg
    assert checkpoint.class_names == ["a", "b", "c"] and checkpoint.data_config == data_config
    assert loaded.pretrained_cfg["mean"] == [0.4, 0.5, 0.6]
    x = batch_for(model)
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_safetensors_files_get_the_mode_the_umask_gives_a_new_file(tmp_path):
    import os

    umask = os.umask(0o022)  # safetensors alone writes 0600: a shared model others cannot read
    try:
        path = vit.save_safetensors(vit.create_model("vit_nano_patch4_32"), tmp_path / "nano.safetensors")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_lightning_checkpoint_contract_is_read(tmp_path, tiny_pair, batch_for):
    reference, ours = tiny_pair
    data_config = {"input_size": [3, 224, 224], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                   "crop_pct": 0.9, "crop_mode": "center"}  # fmt: skip
    ckpt = {
        "epoch": 1,
        "state_dict": {f"model.{k}": v for k, v in ours.state_dict().items()}
        | {f"ema.{k}": torch.zeros_like(v) for k, v in ours.state_dict().items()},
        "vit": {
            "model_config": ours.cfg.to_dict(),
            "class_names": None,
            "data_config": data_config,
            "weights_prefix": "model.",
        },
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    model, checkpoint = vit.load_model(tmp_path / "last.ckpt")
    x = batch_for(model)
    torch.testing.assert_close(logits(model, x), logits(reference, x), rtol=0, atol=TOL)
    assert checkpoint.data_config == data_config


# ------------------------------------------------------------------------------------------ bad input
def test_checkpoint_that_does_not_fit_lists_the_offending_keys(tmp_path, tiny_pair):
    reference, _ = tiny_pair
    state = reference.state_dict()
    path = tmp_path / "tiny2.safetensors"
    save_file(state, str(path))
    with pytest.raises(vit.CheckpointError) as err, warnings.catch_warnings():
        warnings.simplefilter("error")  # a head of another width is mis-shaped, not "another class count"
        vit.create_model("vit_small_patch16_224", pretrained=path, **SMALL)
    assert re.search(r"tiny2\.safetensors does not fit the model \(the checkpoint: width 192, depth 2; the model: "
                     r"width 384, depth 2\); mis-shaped: .*blocks\.0\.attn\.proj\.bias "
                     r"\(192,\) vs model \(384,\).* and \d+ more", str(err.value))  # fmt: skip
    with pytest.raises(vit.CheckpointError, match=r"missing: blocks\.2\.norm1\.weight"):
        vit.create_model(NAME, pretrained=path, depth=3)
    with pytest.raises(vit.CheckpointError, match=r"unexpected: blocks\.1\.attn\.proj\.bias, .* and 4 more$"):
        vit.create_model(NAME, pretrained=path, depth=1)
    model = vit.create_model(NAME, depth=1)
    vit.load_pretrained(model, path, strict=False)  # strict=False loads what fits
    assert torch.equal(model.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight)


def test_state_dict_without_a_vit_or_with_half_an_attention_is_a_checkpoint_error(tmp_path, perturb):
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, tmp_path / "resnet.pth")
    with pytest.raises(vit.CheckpointError, match=r"resnet\.pth: no ViT weights found.*conv1\.weight"):
        vit.read_checkpoint(tmp_path / "resnet.pth")
    state = {k: v for k, v in hf_vit(perturb).state_dict().items() if "layers.1.attention.k_proj" not in k}
    with pytest.raises(vit.CheckpointError, match=r"blocks\.1\.attn\.qkv\.(weight|bias) lacks the attention key"):
        vit.read_checkpoint(state)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin", ".npz", ".ckpt"])
def test_corrupt_file_is_one_line_naming_the_file(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x00\x01 definitely not weights" * 10)
    with pytest.raises(vit.CheckpointError) as err:
        vit.read_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("source", ["missing/weights.pth", "weights.safetensors", "model.npz"])
def test_missing_file_says_so_instead_of_asking_the_hub(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(vit.CheckpointError, match=rf"{source}: no such file"):
        vit.read_checkpoint(source)


def test_a_checkpoint_prints_as_a_summary_not_as_every_tensor(tmp_path):
    model = vit.create_model(NAME, **SMALL)
    checkpoint = vit.read_checkpoint(vit.save_safetensors(model, tmp_path / "w.safetensors", class_names=["a", "b"]))
    shown = repr(checkpoint)
    assert "tensor(" not in shown and f"{len(model.state_dict())} tensors" in shown and "w.safetensors" in shown
    assert "class_names=[a, b]" in shown and len(shown) < 2000


def test_an_image_renamed_ckpt_is_not_called_malicious(tmp_path):
    path = tmp_path / "photo.ckpt"
    Image.new("RGB", (8, 8)).save(path, format="PNG")
    with pytest.raises(vit.CheckpointError) as err:
        vit.read_checkpoint(path)
    assert "photo.ckpt: not a readable PyTorch checkpoint" in str(err.value) and "refused" not in str(err.value)
    assert "operand" not in str(err.value)  # the unpickler's reason ('Unsupported operand 137') means nothing here


@pytest.mark.parametrize(
    "config, problem",
    [
        ("not json", r"not valid JSON"),
        ("[1, 2]", r"not a JSON object"),
        ('{"model_type": "vit"}', r"missing keys 'hidden_size', 'num_hidden_layers'"),
        ('{"hidden_size": 192, "num_hidden_layers": 2, "num_attention_heads": 3, "intermediate_size": 768, '
         '"hidden_act": "elu"}', r"unsupported Hugging Face hidden_act 'elu'"),
        ('{"hidden_size": 192, "num_hidden_layers": 2, "num_attention_heads": 3, "intermediate_size": 768, '
         '"patch_size": [16, 8]}', r"patch_size \[16, 8\] is not square"),
        ('{"hidden_size": "wide", "num_hidden_layers": 2, "num_attention_heads": 3, "intermediate_size": 768}',
         r"not a valid ViT config"),
        ('{"hidden_size": 192, "num_hidden_layers": 2, "num_attention_heads": 5, "intermediate_size": 768}',
         r"not a valid ViT config.*not divisible by num_heads"),
    ],
)  # fmt: skip
def test_broken_hugging_face_config_is_one_line_naming_config_json(tmp_path, perturb, config, problem):
    hf_vit(perturb).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(vit.CheckpointError) as err:
        vit.read_checkpoint(tmp_path)
    assert re.match(re.escape(str(tmp_path / "config.json")) + ": " + problem, str(err.value)), str(err.value)
    assert "\n" not in str(err.value)


def _junk() -> dict[str, bytes]:
    """Bytes that are not a checkpoint, each tripping torch's weights-only unpickler in another way."""
    real = io.BytesIO()
    torch.save({"patch_embed.proj.weight": torch.zeros(4, 3, 2, 2)}, real)
    rng = np.random.default_rng(0)
    return {
        "text": b"text\n",  # IndexError: pop from empty list
        "ab": b"ab",
        "tex": b"tex",
        "hello_world": b"hello world",  # KeyError: 101
        "latin1": b"U\xdcb\xb7",  # UnicodeDecodeError
        "short_int": b"J\xba?",  # struct.error
        "truncated_pickle": pickle.dumps({"a": 1}, protocol=2)[:6],
        "truncated_checkpoint": real.getvalue()[: len(real.getvalue()) // 2],
        "int_keys": pickle.dumps({1: 2}, protocol=2),
        "a_list": pickle.dumps([1, 2], protocol=2),
        **{f"random{i}": rng.bytes(int(rng.integers(1, 64))) for i in range(40)},
    }


def test_junk_named_ckpt_is_one_line_not_a_traceback(tmp_path):
    for name, data in _junk().items():
        path = tmp_path / f"{name}.ckpt"
        path.write_bytes(data)
        with warnings.catch_warnings(record=True) as caught, pytest.raises(vit.CheckpointError) as err:
            warnings.simplefilter("always")
            vit.read_checkpoint(path)
        message = str(err.value)
        assert message.startswith(f"{path}: ") and "\n" not in message and "refused" not in message, name
        assert not caught, f"{name}: {caught[0].message}"  # e.g. torch's 'Detected pickle protocol 132'


class _Payload:
    """Unpickling this writes a marker file: the attack a `.pth` from a stranger could carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch_save", "raw_pickle"])
def test_pickle_that_would_run_code_is_refused(tmp_path, tiny_pair, writer):
    marker = tmp_path / "marker"
    payload = {"state_dict": tiny_pair[1].state_dict(), "hook": _Payload(marker)}
    path = tmp_path / "evil.pth"
    if writer == "torch_save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(vit.CheckpointError) as err:
        vit.create_model(NAME, pretrained=path, **SMALL)
    assert "evil.pth: refused to load" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_model_config_that_is_not_ours_is_a_checkpoint_error(tmp_path):
    model = vit.create_model("vit_nano_patch4_32", depth=1)
    path = vit.save_safetensors(model, tmp_path / "odd.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        state, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    save_file(state, str(path), metadata={**meta, "model_config": '{"embed_dim": 128, "wings": 2}'})
    with pytest.raises(vit.CheckpointError, match=r"odd\.safetensors: its model config is not valid.*wings"):
        vit.load_model(path)


# ------------------------------------------------------------------------------------ hub and URLs
TAG = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
PROXY_VARIABLES = [v for name in ("https_proxy", "http_proxy", "all_proxy") for v in (name, name.upper())]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, perturb) -> torch.nn.Module:
    """A fake Hugging Face cache holding random weights for TAG (loading them proves the tag went through the
    hub code); returns the timm model whose weights they are."""
    return cache_timm_weights(tmp_path, monkeypatch, TAG, perturb(timm.create_model(NAME)).eval())


def cache_timm_weights(tmp_path: Path, monkeypatch, tag: str, reference: torch.nn.Module) -> torch.nn.Module:
    """Put `reference`'s weights in a fake Hugging Face cache as timm's weights for `tag`."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hf" / "hub"
    repo = cache / f"models--timm--{tag}"
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    save_file(reference.state_dict(), str(repo / "snapshots" / "0123abc" / "model.safetensors"))
    for var, value in (("HF_HOME", tmp_path / "hf"), ("HF_HUB_CACHE", cache)):
        monkeypatch.setenv(var, str(value))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))  # huggingface_hub read the variables at import
    return reference


@pytest.fixture
def closed_hub(monkeypatch) -> str:
    """huggingface_hub pointed (as HF_ENDPOINT would at import) at a local port nobody listens on, no proxy, not
    in offline mode: an unreachable Hub, without leaving the machine."""
    import huggingface_hub.constants as hub

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    for var in (*PROXY_VARIABLES, "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "ENDPOINT", endpoint)
    monkeypatch.setattr(hub, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    return endpoint


def test_timm_hub_tag_loads_through_timms_hub_code_offline(monkeypatch, hub_cache, batch_for):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    model = vit.create_model(TAG, pretrained=True)
    x = batch_for(model, batch=1)
    torch.testing.assert_close(logits(model, x), logits(hub_cache, x), rtol=0, atol=TOL)
    checkpoint = vit.read_checkpoint(TAG)
    assert len(checkpoint.class_names) == 1000 and checkpoint.data_config["input_size"] == (3, 224, 224)
    with pytest.raises(vit.CheckpointError, match=r"^vit_tiny_patch16_384\.augreg_in21k_ft_in1k: could not fetch"):
        vit.read_checkpoint("timm/vit_tiny_patch16_384.augreg_in21k_ft_in1k")  # not in the cache, and offline


def test_timm_tag_of_an_architecture_without_a_variant_of_ours_loads_with_timms_config(
    tmp_path, monkeypatch, perturb, batch_for
):
    # DeiT: no variant of ours is named so (was: "the file carries no model config; name its variant with --model")
    import huggingface_hub.constants as hub

    tag = "deit_tiny_patch16_224.fb_in1k"
    reference = cache_timm_weights(tmp_path, monkeypatch, tag, perturb(timm.create_model(tag)).eval())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    model, checkpoint = vit.load_model(tag)
    assert model.cfg.embed_dim == 192 and checkpoint.data_config["mean"] != (0.5,) * 3  # DeiT's: ImageNet's mean
    x = batch_for(model, batch=1)
    torch.testing.assert_close(logits(model, x), logits(reference, x), rtol=0, atol=TOL)


def test_cached_timm_weights_load_without_a_request_when_the_hub_is_unreachable(
    monkeypatch, hub_cache, closed_hub, batch_for
):
    from huggingface_hub.utils import get_session

    # huggingface_hub's HTTP client: httpx in huggingface_hub 1, httpx2 in 2
    http = importlib.import_module(type(get_session()).__module__.partition(".")[0])
    monkeypatch.setattr(http.HTTPTransport, "handle_request", lambda *a, **k: pytest.fail("an HTTP request"))
    model = vit.create_model(TAG, pretrained=True)  # HF_HUB_OFFLINE unset: the cache must serve without asking
    x = batch_for(model, batch=1)
    torch.testing.assert_close(logits(model, x), logits(hub_cache, x), rtol=0, atol=TOL)


def test_uncached_timm_weights_fail_fast_when_the_hub_is_unreachable(tmp_path, monkeypatch, closed_hub, caplog):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty"))
    start = time.monotonic()
    with pytest.raises(vit.CheckpointError) as err:
        vit.read_checkpoint(NAME)
    assert time.monotonic() - start < 5 and "Retrying" not in caplog.text
    message = str(err.value)
    assert (
        message.startswith(f"{NAME}: could not fetch timm weights: {closed_hub} is unreachable (")
        and "\n" not in message
    )
    assert "not in the Hugging Face cache" in message and "local weights file or folder in its place" in message


def test_hub_probe_leaves_proxies_to_decide_and_sees_a_listening_endpoint(monkeypatch, closed_hub):
    from vit.hub import hub_unreachable

    assert "Connection refused" in hub_unreachable()
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")  # only the proxy knows whether the Hub answers
    assert hub_unreachable() is None
    monkeypatch.delenv("HTTPS_PROXY")
    with socket.create_server(("127.0.0.1", 0)) as server:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_unreachable() is None


@pytest.mark.parametrize("source", ["not_a_model_name", "hfvit_typo"])
def test_a_name_that_is_neither_a_path_nor_a_timm_model_says_so(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("socket.create_connection", lambda *a, **k: pytest.fail("asked the network"))
    with pytest.raises(vit.CheckpointError, match=rf"^{source}: no such file or folder, and not a timm model name "
                                                  r"\(see `vit models`\)$"):  # fmt: skip
        vit.read_checkpoint(source)


@pytest.mark.parametrize(
    "source, message",
    [
        ("vit_nano_patch4_32", "timm has no pretrained weights of that name"),
        ("vit_base_patch16_reg4_gap_256", "timm has no pretrained weights of that name"),
        ("vit_small_patch16_224.no_tag", "timm has no pretrained tag 'no_tag' for vit_small_patch16_224 (its tags: "),
    ],
)
def test_a_model_name_without_timm_weights_says_so_without_asking_the_network(tmp_path, monkeypatch, source, message):
    import timm

    # ours, an architecture timm leaves untrained, a tag timm lacks: timm's own list is the oracle
    assert not timm.list_pretrained(source if "." in source else f"{source}.*")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("socket.create_connection", lambda *a, **k: pytest.fail("asked the network"))
    with pytest.raises(vit.CheckpointError, match=rf"^{re.escape(source)}: {re.escape(message)}"):
        vit.read_checkpoint(source)


def test_file_url_is_downloaded_into_the_hub_cache_and_read(tmp_path, monkeypatch, timm_file, batch_for):
    reference, path = timm_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    other = tmp_path / "other" / path.name  # the same file name under another URL must not collide
    other.parent.mkdir()
    save_file(vit.create_model(NAME, **SMALL).state_dict(), str(other))
    model = vit.create_model(NAME, pretrained=path.as_uri(), **SMALL)
    x = batch_for(model)
    torch.testing.assert_close(logits(model, x), logits(reference, x), rtol=0, atol=TOL)
    assert list((tmp_path / "torch" / "hub" / "checkpoints").glob(f"*{path.name}"))
    assert not torch.equal(vit.read_checkpoint(other.as_uri()).state_dict["pos_embed"], reference.pos_embed)
    with pytest.raises(vit.CheckpointError, match="download failed"):
        vit.read_checkpoint((tmp_path / "gone.safetensors").as_uri())


def test_grey_checkpoint_loads_into_an_rgb_model_and_sees_a_grey_image_alike(tmp_path):
    # timm's adapt_input_conv assumes a 3-channel source: a 1-channel conv came back unchanged, and did not fit
    grey = vit.create_model("vit_nano_patch4_32", in_chans=1, depth=2, num_classes=4)
    path = vit.save_safetensors(grey, tmp_path / "grey.safetensors")
    rgb = vit.create_model("vit_nano_patch4_32", pretrained=path, in_chans=3, depth=2)
    x = torch.rand(2, 1, 32, 32)
    # the same grey picture in three equal channels is the same input to the adapted convolution
    torch.testing.assert_close(logits(rgb, x.expand(-1, 3, -1, -1)), logits(grey, x), rtol=0, atol=TOL)
