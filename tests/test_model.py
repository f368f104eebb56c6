"""The model against timm's VisionTransformer on the same weights: logits, shapes, the API around them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

import vit

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5

# Each case covers a feature: token vs avg pooling, registers, patch 32, 384 px, qk-norm, LayerScale.
TIMM_CASES = {
    "token_pool": ("vit_tiny_patch16_224", {}),
    "registers_avg_pool_layerscale": ("vit_medium_patch16_reg4_gap_256", {}),
    "registers_no_layerscale": ("vit_base_patch16_reg4_gap_256", {}),
    "patch32": ("vit_base_patch32_224", {}),
    "input_384": ("vit_small_patch16_384", {}),
    "qk_norm": ("vit_small_patch16_224", {"qk_norm": True}),
    "layerscale_avg_pool": ("vit_tiny_patch16_224", {"init_values": 1e-5, "global_pool": "avg"}),
}


@pytest.mark.parametrize("case", TIMM_CASES)
def test_timm_weights_give_identical_logits(case, pair, batch_for):
    name, overrides = TIMM_CASES[case]
    reference, ours = pair(name, depth=2, **overrides)
    x = batch_for(ours)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert got.shape == expected.shape == (2, 1000)
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)


TIMM_KWARGS = [
    dict(img_size=64, patch_size=16, embed_dim=96, depth=2, num_heads=3, num_classes=7),
    dict(img_size=(48, 64), patch_size=8, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0, qkv_bias=False,
         qk_norm=True, class_token=True, reg_tokens=2, global_pool="avg", init_values=0.1, num_classes=5),
    dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, class_token=False, global_pool="avg",
         num_classes=3),
]  # fmt: skip


@pytest.mark.parametrize("kw", TIMM_KWARGS, ids=["plain", "every_option", "no_class_token"])
def test_timm_constructor_arguments_build_the_same_network(kw, perturb):
    reference = perturb(TimmViT(**kw)).eval()
    ours = vit.VisionTransformer(vit.ViTConfig(**kw)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    h, w = ours.cfg.img_hw
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=TOL)


SHARED_NAMES = [name for name in vit.list_models() if name in set(timm.list_models())]


def test_most_variants_are_timm_names():
    assert len(SHARED_NAMES) >= 15 and "vit_medium_patch16_reg4_gap_256" in SHARED_NAMES


@pytest.mark.parametrize("name", SHARED_NAMES)
def test_state_dict_matches_timm_key_for_key(name):
    with torch.device("meta"):  # no memory, no init: shapes only
        expected = {k: v.shape for k, v in timm.create_model(name).state_dict().items()}
        got = {k: v.shape for k, v in vit.create_model(name).state_dict().items()}
    assert got == expected


def test_meta_device_builds_without_allocating():
    with torch.device("meta"):
        model = vit.create_model("vit_huge_patch14_224")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 600e6


@pytest.mark.parametrize("name", SHARED_NAMES)
def test_every_shared_variant_computes_what_timm_computes(name, pair, batch_for):
    """One block is enough to catch a wrong pooling, norm placement, eps, activation or prefix layout."""
    reference, ours = pair(name, depth=1)
    x = batch_for(ours, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=TOL)


# ------------------------------------------------------------------------------------------- input size
def test_dynamic_img_size_accepts_non_square_input_like_timm(pair):
    reference, ours = pair("vit_tiny_patch16_224", depth=2, dynamic_img_size=True)
    x = torch.randn(2, 3, 160, 288)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
    assert ours.forward_features(x).shape == (2, 1 + 10 * 18, 192)


def test_dynamic_img_size_at_native_size_changes_nothing(tiny_pair, batch_for):
    _, fixed = tiny_pair
    dynamic = vit.create_model("vit_tiny_patch16_224", depth=2, dynamic_img_size=True).eval()
    dynamic.load_state_dict(fixed.state_dict())
    x = batch_for(fixed)
    with torch.no_grad():
        assert torch.equal(dynamic(x), fixed(x))


@pytest.mark.parametrize(
    ("shape", "expected"),
    [((2, 1, 224, 224), "(B, 3, H, W)"), ((2, 3, 192, 224), "(B, 3, 224, 224)"), ((3, 224, 224), "(B, 3, H, W)")],
    ids=["channels", "size", "unbatched"],
)
def test_wrong_input_shape_names_expected_and_given_shape(tiny_pair, shape, expected):
    _, model = tiny_pair
    with pytest.raises(ValueError) as err:
        model(torch.randn(*shape))
    assert expected in str(err.value) and str(tuple(shape)) in str(err.value)


def test_dynamic_size_must_still_be_divisible_by_the_patch():
    model = vit.create_model("vit_tiny_patch16_224", depth=1, dynamic_img_size=True)
    with pytest.raises(ValueError, match=r"\(200, 224\).*patch_size=16"):
        model(torch.randn(1, 3, 200, 224))


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(ValueError, match="did you mean vit_tiny_patch16_224"):
        vit.create_model("vit_tiny_patch16_225")
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        vit.create_model("resnet50")


@pytest.mark.parametrize("name", ["vit_small_patch16_224.nosuchtag", "deit3_small_patch16_224.nosuchtag"])
def test_an_unknown_pretrained_tag_is_refused_as_timm_refuses_it_naming_the_tags_it_has(name):
    arch, tag = name.split(".")
    with pytest.raises(RuntimeError, match=r"Invalid pretrained tag \(nosuchtag\)"):  # timm's, even untrained
        timm.create_model(name, pretrained=False)
    known = timm.list_pretrained(f"{arch}.*")
    with pytest.raises(ValueError) as refused:
        vit.create_model(name)
    message = str(refused.value)
    assert message.startswith(f"{name}: ") and f"{tag!r}" in message and "\n" not in message
    assert all(known_tag.split(".", 1)[1] in message for known_tag in known[:2])
    assert all(vit.model_config(known_tag) for known_tag in known)  # the tags timm has still build


def test_a_tag_on_a_variant_of_our_own_is_refused():
    with pytest.raises(ValueError, match=r"^vit_nano_patch4_32.x: no pretrained tag 'x' .* a variant of vit's own"):
        vit.create_model("vit_nano_patch4_32.x")


def test_a_misspelt_config_field_is_a_value_error_naming_the_field_meant():
    for build in (
        lambda: vit.create_model("vit_tiny_patch16_224", deptth=1),
        lambda: vit.VisionTransformer(embed_dims=32),
        lambda: vit.ViTConfig.from_dict({"patch": 4}),
    ):
        with pytest.raises(ValueError, match=r"is not a ViTConfig field; did you mean '(depth|embed_dim|patch_size)'"):
            build()
    assert vit.ViTConfig.from_dict(vit.ViTConfig(depth=2).to_dict()) == vit.ViTConfig(depth=2)


def test_config_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="class_token"):
        vit.ViTConfig(class_token=False, global_pool="token")
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        vit.ViTConfig(embed_dim=100, num_heads=3)
    with pytest.raises(ValueError, match="patch_size"):
        vit.ViTConfig(img_size=225)
    with pytest.raises(ValueError, match=r"conv_stem=\[8, 8, 8\] halves the image more often"):
        vit.ViTConfig(patch_size=4, img_size=32, conv_stem=[8, 8, 8])


# ----------------------------------------------------------------------------------------- conv stem
STEM = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5)


def test_conv_stem_halves_the_image_per_conv_and_projects_the_rest_of_the_patch():
    model = vit.VisionTransformer(vit.ViTConfig(**STEM, conv_stem=[8, 16]))
    convs = [m for m in model.patch_embed.stem if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [(3, 8, (2, 2)), (8, 16, (2, 2))]
    assert model.patch_embed.proj.kernel_size == (2, 2)  # 8 / 2 / 2
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 1 + 16, 32)  # a 4x4 grid, as without
    assert model.cfg.to_dict()["conv_stem"] == [8, 16]  # plain values for checkpoints


def test_conv_stem_off_is_timms_patch_embedding_and_on_adds_only_stem_keys():
    plain = vit.VisionTransformer(vit.ViTConfig(**STEM))
    timm_model = TimmViT(**STEM)
    assert list(plain.state_dict()) == list(timm_model.state_dict())
    stem = vit.VisionTransformer(vit.ViTConfig(**STEM, conv_stem=[8]))
    added = set(stem.state_dict()) - set(plain.state_dict())
    assert added and all(k.startswith("patch_embed.stem.") for k in added)


def test_conv_stem_model_round_trips_through_safetensors_with_its_batchnorm_statistics(tmp_path):
    model = vit.VisionTransformer(vit.ViTConfig(**STEM, conv_stem=[8, 16]))
    model.train()
    model(torch.randn(8, 3, 32, 32) * 3 + 1)  # moves the BatchNorm running statistics off their defaults
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    loaded, _ = vit.load_model(vit.save_safetensors(model, tmp_path / "stem.safetensors"))
    assert torch.equal(loaded.eval()(x), model(x))


def test_timm_weights_into_a_conv_stem_model_name_the_missing_stem(tmp_path):
    torch.save(TimmViT(**STEM).state_dict(), tmp_path / "timm.pth")
    model = vit.VisionTransformer(vit.ViTConfig(**STEM, conv_stem=[8]))
    with pytest.raises(vit.CheckpointError, match=r"patch_embed\.stem\.0\.weight"):
        vit.load_pretrained(model, tmp_path / "timm.pth")


# ---------------------------------------------------------------------------------------------- the API
@pytest.mark.parametrize("output_fmt", ["NCHW", "NLC"])
@pytest.mark.parametrize("norm", [False, True])
def test_forward_intermediates_match_timm(pair, batch_for, output_fmt, norm):
    reference, ours = pair("vit_tiny_patch16_224", depth=3, reg_tokens=2)
    x = batch_for(ours)
    for indices in (2, [0, -1], None):
        kw = dict(indices=indices, norm=norm, output_fmt=output_fmt, return_prefix_tokens=True)
        with torch.no_grad():
            final_t, inter_t = reference.forward_intermediates(x, **kw)
            final_o, inter_o = ours.forward_intermediates(x, **kw)
        torch.testing.assert_close(final_o, final_t, rtol=0, atol=TOL)
        assert len(inter_o) == len(inter_t)
        for (maps_o, prefix_o), (maps_t, prefix_t) in zip(inter_o, inter_t):
            torch.testing.assert_close(maps_o, maps_t, rtol=0, atol=TOL)
            torch.testing.assert_close(prefix_o, prefix_t, rtol=0, atol=TOL)
    assert inter_o[0][0].shape == ((2, 192, 14, 14) if output_fmt == "NCHW" else (2, 196, 192))
    assert inter_o[0][1].shape == (2, 3, 192)  # class token and two registers
    early = ours.forward_intermediates(
        x, [0], norm=norm, stop_early=True, intermediates_only=True, output_fmt=output_fmt
    )
    torch.testing.assert_close(early[0], inter_o[0][0], rtol=0, atol=TOL)


def test_forward_head_pre_logits_gives_pooled_features_like_timm(pair, batch_for):
    for name in ("vit_tiny_patch16_224", "vit_medium_patch16_reg4_gap_256"):
        reference, ours = pair(name, depth=1)
        x = batch_for(ours)
        with torch.no_grad():
            tokens = ours.forward_features(x)
            torch.testing.assert_close(tokens, reference.forward_features(x), rtol=0, atol=TOL)
            pooled = ours.forward_head(tokens, pre_logits=True)
            torch.testing.assert_close(pooled, reference.forward_head(tokens, pre_logits=True), rtol=0, atol=TOL)
        assert pooled.shape == (2, ours.embed_dim)


def test_reset_classifier_matches_timm(tiny_pair, batch_for):
    reference, ours = tiny_pair
    x = batch_for(ours)
    ours.reset_classifier(7)
    assert ours(x).shape == (2, 7) and ours.num_classes == 7 and not ours.head.training
    for model in (reference, ours):
        model.reset_classifier(0, global_pool="avg")  # features, averaged over patches, norm kept where it was
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=TOL)
    assert ours(x).shape == (2, 192) and ours.cfg.global_pool == "avg"


def test_grad_checkpointing_recomputes_blocks_and_gives_the_same_gradients(batch_for):
    model = vit.create_model("vit_tiny_patch16_224", depth=2, drop_path_rate=0.2, proj_drop_rate=0.1).train()
    x = batch_for(model)
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))  # recompute stops early: no post-hook

    def grads(enable: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(1)  # the same dropout masks; checkpoint replays the RNG state on recompute
        model(x).logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, n_plain = grads(False), len(calls)
    checkpointed = grads(True)
    assert n_plain == 1 and len(calls) - n_plain == 2  # the block ran again in the backward pass
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-6, msg=name)


def test_attention_hook_path_equals_sdpa_and_gives_timm_probabilities(tiny_pair, batch_for):
    reference, ours = tiny_pair
    x = batch_for(ours)
    expected_probs = []
    for block in reference.blocks:  # timm's explicit path passes the probabilities through attn_drop
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, inp, out: expected_probs.append(out))
    probs = []
    with torch.no_grad():
        fast = ours(x)
        for block in ours.blocks:
            block.attn.attn_hook = probs.append
        recorded = ours(x)
        reference(x)
    torch.testing.assert_close(recorded, fast, rtol=0, atol=TOL)
    assert [p.shape for p in probs] == [(2, 3, 197, 197)] * 2
    for got, expected in zip(probs, expected_probs):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_cpu_autocast_trains_attention_in_float32_and_infers_in_bfloat16(monkeypatch, batch_for):
    model = vit.create_model("vit_tiny_patch16_224", depth=2, img_size=32)
    x = batch_for(model)
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append(q.dtype)
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = model(x)
        trained.float().sum().backward()
        assert seen == [torch.float32] * 2 and trained.dtype == torch.bfloat16  # the rest stays in bfloat16
        seen.clear()
        with torch.no_grad():
            inferred = model(x)
    assert seen == [torch.bfloat16] * 2
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    torch.testing.assert_close(trained.detach().float(), inferred.float(), rtol=0, atol=0.05)  # bfloat16's spread


def test_optimizer_helpers_follow_timm(tiny_pair):
    reference, ours = tiny_pair
    assert ours.no_weight_decay() >= set(reference.no_weight_decay()) - {"dist_token"}
    from timm.optim import param_groups_layer_decay

    groups = lambda m: sorted((g["lr_scale"], len(g["params"])) for g in param_groups_layer_decay(m, layer_decay=0.7))
    assert groups(ours) == groups(reference)


def test_data_config_resolves_through_timm(tiny_pair):
    _, ours = tiny_pair
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config(model=ours)
    assert config["input_size"] == (3, 224, 224) and config["interpolation"] == "bicubic"
    assert create_transform(**config) is not None


# ------------------------------------------------------------------------------------------- benchmark
def test_throughput_benchmark_runs_quick():
    out = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    for name in ("vit_tiny_patch16_224", "vit_small_patch16_224"):
        line = next(line for line in out.stdout.splitlines() if line.startswith(name))
        assert "ours/timm" in line


def test_import_vit_is_light_and_every_public_name_is_there_on_first_use():
    # the `vit` command relies on the first: torch imports inside its main(), which turns a Ctrl-C into one line
    code = """
import sys, types
import vit
assert "torch" not in sys.modules, "import vit imported torch"
from vit.explain import METHODS  # the submodule first: `vit.explain` must stay the function all the same
assert callable(vit.explain) and not isinstance(vit.explain, types.ModuleType), vit.explain
for name in vit.__all__:
    assert getattr(vit, name) is getattr(sys.modules[getattr(vit, name).__module__], name), name
assert sorted(set(vit.__all__) - set(dir(vit))) == []
assert vit.data.DigitsDataModule and not hasattr(vit, "no_such_name")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
