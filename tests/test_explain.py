"""Attention maps: recording, rollout and relevance, batching, register tokens, faithfulness and `vit attention`."""

from __future__ import annotations

import copy
import inspect
import json
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import timm.models.vision_transformer as timm_vit
import torch
from PIL import Image
from timm.data import create_transform

import vit
import vit.cli
from benchmarks.attention_faithfulness import DIGITS_VIT, digits_tensors, random_maps, train_digits_vit
from vit.explain import METHODS, chefer_relevance, head_maps, record_attention, rollout
from vit.faithfulness import deletion_curve, deletion_score, insertion_curve, insertion_score
from vit.predict import Predictor
from vit.visualize import head_grid

ALL_METHODS = sorted(METHODS)


def peaked(cfg: vit.ViTConfig, seed: int = 0) -> vit.VisionTransformer:
    """A random float64 ViT with large weights: attention far from uniform, so maps have contrast to compare."""
    torch.manual_seed(seed)
    model = vit.VisionTransformer(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.3)
    return model


def small_cfg(**kw) -> vit.ViTConfig:
    base = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=3, num_heads=4)
    return vit.ViTConfig(**{**base, **kw})


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is several times faster than two on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits():
    """A ViT trained briefly on digits (about 10 s) and the first 96 test images."""
    model = train_digits_vit(epochs=15)
    _, _, x, y = digits_tensors(DIGITS_VIT["img_size"])
    return model, x[:96], y[:96]


# ------------------------------------------------------------------------------- rollout and relevance
def test_rollout_of_identity_attention_is_identity_and_uniform_over_patches():
    B, heads, N = 2, 3, 7
    eye = torch.eye(N).expand(B, heads, N, N)
    joint = rollout([eye] * 4)
    torch.testing.assert_close(joint, torch.eye(N).expand(B, N, N))
    cls_to_patches = joint[:, 0, 1:]
    assert torch.all(cls_to_patches == cls_to_patches[:, :1])


def test_rollout_of_uniform_attention_is_uniform_over_patches():
    B, heads, N = 2, 3, 7
    uniform = torch.full((B, heads, N, N), 1.0 / N)
    joint = rollout([uniform] * 3)
    torch.testing.assert_close(joint[:, 0, 1:], joint[:, 0, 1:2].expand(B, N - 1))
    torch.testing.assert_close(joint.sum(-1), torch.ones(B, N))


def test_rollout_rows_are_distributions_over_input_tokens():
    # Softmax along the keys, not symmetric: normalising columns instead of rows breaks this.
    torch.manual_seed(0)
    maps = [torch.randn(2, 4, 9, 9).mul(3).softmax(-1) for _ in range(5)]
    for fusion in ("mean", "max", "min"):
        joint = rollout(maps, head_fusion=fusion, discard_ratio=0.3)
        torch.testing.assert_close(joint.sum(-1), torch.ones(2, 9))
        assert (joint >= 0).all()
        assert not torch.allclose(joint.sum(-2), torch.ones(2, 9))


def _two_hop(N: int = 7) -> list[torch.Tensor]:
    """Block 1: token 5 reads token 3. Block 2: the class token reads token 5. All else attends to itself."""
    first, second = torch.eye(N), torch.eye(N)
    first[5] = torch.eye(N)[3]
    second[0] = torch.eye(N)[5]
    return [first.expand(1, 2, N, N), second.expand(1, 2, N, N)]


@pytest.mark.parametrize("method", ["rollout", "chefer"])
def test_relevance_follows_information_through_the_blocks_in_order(method):
    maps = _two_hop()
    fn = rollout if method == "rollout" else lambda m: chefer_relevance(m, [torch.ones_like(a) for a in m])
    assert fn(maps)[0, 0, 3] > 0  # cls <- 5 <- 3
    assert fn(maps[::-1])[0, 0, 3] == 0  # in the other order token 3 never reaches the class token


def test_discard_ratio_drops_the_weakest_weights():
    torch.manual_seed(0)
    attn = torch.rand(1, 1, 6, 6).softmax(-1)
    kept = rollout([attn], discard_ratio=0.5)[0]
    weak = torch.zeros(36, dtype=torch.bool)
    weak[attn.flatten().argsort()[:18]] = True
    weak = weak.view(6, 6)
    off_diagonal = ~torch.eye(6, dtype=torch.bool)
    assert (kept[weak & off_diagonal] == 0).all()
    assert (kept[~weak & off_diagonal] > 0).all()


def test_chefer_relevance_ignores_attention_that_lowers_the_target():
    torch.manual_seed(0)
    maps = [torch.rand(2, 3, 5, 5).softmax(-1) for _ in range(3)]
    against = [-torch.rand_like(a) for a in maps]
    torch.testing.assert_close(chefer_relevance(maps, against), torch.eye(5).expand(2, 5, 5))


# ------------------------------------------------------------------------------------------ recording
def test_record_attention_maps_equal_attention_computed_from_the_weights():
    model = peaked(small_cfg(reg_tokens=2))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    block_input = {}
    model.blocks[0].attn.register_forward_hook(lambda m, args, out: block_input.setdefault("x", args[0]))
    with record_attention(model) as rec:
        model(x)
    t, (B, N, D), h = block_input["x"], block_input["x"].shape, 4
    qkv = torch.nn.functional.linear(t, model.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.bias)
    q, k, _ = qkv.reshape(B, N, 3, h, D // h).permute(2, 0, 3, 1, 4)
    expected = (q @ k.transpose(-2, -1) / (D // h) ** 0.5).softmax(-1)
    assert len(rec.maps) == 3
    torch.testing.assert_close(rec.maps[0], expected)


def test_record_attention_maps_equal_timm_explicit_attention_in_every_block():
    model = peaked(small_cfg(reg_tokens=2, no_embed_class=True, qk_norm=True))
    params = inspect.signature(timm_vit.VisionTransformer.__init__).parameters
    ref = timm_vit.VisionTransformer(**{k: v for k, v in model.cfg.to_dict().items() if k in params}).double()
    ref.load_state_dict(model.state_dict())
    ref = ref.eval()
    expected = []
    for block in ref.blocks:
        block.attn.fused_attn = False  # timm's explicit path hands the probabilities to attn_drop
        block.attn.attn_drop.register_forward_hook(lambda m, args, out: expected.append(args[0]))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with record_attention(model) as rec:
        logits = model(x)
    torch.testing.assert_close(logits, ref(x))
    assert len(rec.maps) == len(expected) == 3
    for ours, theirs in zip(rec.maps, expected):
        torch.testing.assert_close(ours, theirs)


def test_logits_while_recording_equal_the_sdpa_logits():
    model = vit.VisionTransformer(small_cfg(reg_tokens=1)).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        fast = model(x)
        with record_attention(model) as rec:
            recorded = model(x)
    assert len(rec.maps) == 3
    torch.testing.assert_close(recorded, fast, atol=1e-5, rtol=1e-5)


def test_recorded_maps_keep_gradients_and_hold_the_latest_forward_only():
    model = peaked(small_cfg())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with record_attention(model) as rec:
        model(x)
        logits = model(x)
        logits[:, 1].sum().backward()
    assert len(rec.maps) == 3 and all(g is not None and g.abs().sum() > 0 for g in rec.grads)


def test_record_attention_restores_hooks_and_checkpointing_after_an_error():
    model = vit.VisionTransformer(small_cfg())
    model.set_grad_checkpointing(True)
    mine = lambda attn: None
    model.blocks[1].attn.attn_hook = mine
    with pytest.raises(RuntimeError, match="boom"), record_attention(model):
        assert all(b.attn.attn_hook is not None for b in model.blocks) and not model.grad_checkpointing
        raise RuntimeError("boom")
    assert [b.attn.attn_hook for b in model.blocks] == [None, mine, None]
    assert model.grad_checkpointing


# ------------------------------------------------- against reference implementations on timm's attention
def _timm_oracle(model: vit.VisionTransformer, x: torch.Tensor, target: torch.Tensor | None = None):
    """timm's model on the same weights, explicit attention: its probabilities (at attn_drop's input) and, when
    `target` is given, their gradients of the sum of the target logits."""
    params = inspect.signature(timm_vit.VisionTransformer.__init__).parameters
    ref = timm_vit.VisionTransformer(**{k: v for k, v in model.cfg.to_dict().items() if k in params}).double()
    ref.load_state_dict(model.state_dict())  # float64 weights into float64 parameters, not rounded to float32
    ref = ref.eval()
    maps = []
    for block in ref.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_pre_hook(lambda m, args: maps.append(args[0]))
    with torch.set_grad_enabled(target is not None):
        logits = ref(x)
    if target is None:
        return maps, None
    grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), maps)
    return [a.detach() for a in maps], list(grads)


def _reference_map(joint: torch.Tensor, model: vit.VisionTransformer, size: tuple[int, int]) -> torch.Tensor:
    """The row of the token the head reads (the class token, else the mean of the patch rows) of a token-to-token
    matrix, patch columns only, upsampled (bilinear) and min-max scaled."""
    prefix, grid = model.num_prefix_tokens, model.patch_embed.grid_size
    rows = joint[:, 0] if model.cfg.global_pool == "token" else joint[:, prefix:].mean(1)
    m = torch.nn.functional.interpolate(rows[:, prefix:].reshape(-1, 1, *grid), size=size, mode="bilinear")
    return _minmax(m[:, 0])


def _reference_rollout(maps, fusion="mean", discard_ratio=0.0):
    """Abnar & Zuidema 2020 (A + I, rows normalised, A_L ... A_1), heads fused and the weakest weights of each image
    zeroed first as in jacobgil/vit-explain; one image and one block at a time."""
    B, _, N, _ = maps[0].shape
    out = []
    for b in range(B):
        joint = torch.eye(N, dtype=maps[0].dtype)
        for attn in maps:
            a = {"mean": attn[b].mean(0), "max": attn[b].max(0).values, "min": attn[b].min(0).values}[fusion]
            flat = a.flatten().clone()
            flat[flat.argsort()[: int(N * N * discard_ratio)]] = 0
            a = flat.view(N, N) + torch.eye(N, dtype=a.dtype)
            joint = (a / a.sum(-1, keepdim=True)) @ joint
        out.append(joint)
    return torch.stack(out)


def _reference_grad_rollout(maps, grads):
    """jacobgil/vit-explain's grad_rollout: (mean over heads of A * dA)+, then rollout (rows normalised)."""
    fused = [(a * g).mean(1, keepdim=True).clamp(min=0) for a, g in zip(maps, grads)]
    return _reference_rollout(fused)


def _reference_chefer(maps, grads):
    """Chefer et al.'s ViT notebook (generate_relevance): R = I; R += mean_h((dA * A).clamp(min=0)) @ R per block."""
    B, _, N, _ = maps[0].shape
    relevance = torch.eye(N, dtype=maps[0].dtype).repeat(B, 1, 1)
    for a, g in zip(maps, grads):
        relevance = relevance + (g * a).clamp(min=0).mean(1) @ relevance
    return relevance


@pytest.mark.parametrize("pooling", ["class token", "average"])
@pytest.mark.parametrize(
    "method, options",
    [
        ("rollout", {}),
        ("rollout", dict(head_fusion="max", discard_ratio=0.5)),
        ("rollout", dict(head_fusion="min", discard_ratio=0.9)),
        ("grad_rollout", {}),
        ("chefer", {}),
    ],
)
def test_maps_equal_reference_implementations_on_timm_attention(method, options, pooling):
    average = dict(class_token=False, global_pool="avg") if pooling == "average" else {}
    model = peaked(small_cfg(img_size=(16, 24), reg_tokens=2, **average))
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    target = torch.tensor([1, 3])
    maps, grads = _timm_oracle(model, x, target if method != "rollout" else None)
    if method == "rollout":
        joint = _reference_rollout(maps, options.get("head_fusion", "mean"), options.get("discard_ratio", 0.0))
    else:
        joint = (_reference_grad_rollout if method == "grad_rollout" else _reference_chefer)(maps, grads)
    expected = _reference_map(joint, model, (16, 24))
    given = {} if method == "rollout" else {"target": target}
    torch.testing.assert_close(vit.explain(model, x, method, **given, **options), expected)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_gradient_methods_give_the_same_maps_under_no_grad_and_inference_mode(method):
    model = peaked(small_cfg())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    expected = vit.explain(model, x, method)
    with torch.no_grad():
        torch.testing.assert_close(vit.explain(model, x, method), expected)
    with torch.inference_mode():
        made_here = x.clone()  # an inference tensor, which cannot require grad itself
        torch.testing.assert_close(vit.explain(model, made_here, method), expected)
    torch.testing.assert_close(vit.explain(model, made_here, method), expected)


# --------------------------------------------------------------------------------------------- maps
@pytest.mark.parametrize("method", ALL_METHODS)
def test_each_map_is_independent_of_the_other_images_in_its_batch(method, digits):
    model, x, _ = digits
    model, x = copy.deepcopy(model).double(), x[:4].double()
    batch = vit.explain(model, x, method)
    single = torch.cat([vit.explain(model, x[i : i + 1], method) for i in range(len(x))])
    torch.testing.assert_close(batch, single)
    assert not torch.allclose(batch[0], batch[1])  # the maps differ, so the comparison means something


@pytest.mark.parametrize("method", ALL_METHODS)
def test_maps_are_in_unit_range_at_input_resolution_for_non_square_dynamic_input(method):
    model = peaked(small_cfg(reg_tokens=2, dynamic_img_size=True))
    maps = vit.explain(model, torch.randn(2, 3, 12, 20, dtype=torch.float64), method)
    assert maps.shape == (2, 12, 20)
    assert (maps.flatten(1).amin(1) == 0).all() and (maps.flatten(1).amax(1) == 1).all()


def _minmax(t: torch.Tensor) -> torch.Tensor:
    flat = t.flatten(1)
    return ((flat - flat.amin(1, keepdim=True)) / (flat.amax(1, keepdim=True) - flat.amin(1, keepdim=True))).view_as(t)


def test_register_tokens_are_excluded_from_the_maps():
    # Patch size 1: the map is the token grid itself, so it can be read off the recorded attention directly.
    model = peaked(small_cfg(img_size=(4, 6), patch_size=1, reg_tokens=4))
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    with record_attention(model) as rec:
        model(x)
    cls_to_patches = rec.maps[-1][:, 2, 0, 1 + 4 :]  # after the class token and 4 registers
    torch.testing.assert_close(vit.explain(model, x, "raw", head=2), _minmax(cls_to_patches.view(2, 4, 6)))


def test_average_pooled_model_without_class_token_reads_the_mean_of_the_patch_rows():
    model = peaked(small_cfg(img_size=(4, 6), patch_size=1, class_token=False, global_pool="avg", reg_tokens=1))
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    with record_attention(model) as rec:
        model(x)
    patches_to_patches = rec.maps[0].mean(1)[:, 1:, 1:].mean(1)
    torch.testing.assert_close(vit.explain(model, x, "raw", layer=0), _minmax(patches_to_patches.view(2, 4, 6)))


@pytest.mark.parametrize("method", ["raw", "rollout"])
def test_a_target_given_to_a_method_that_maps_every_class_alike_is_warned_about(method):
    model = peaked(small_cfg())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with pytest.warns(UserWarning, match=f"{method} maps are the same for every class: target is not used"):
        maps = vit.explain(model, x, method, target=1)
    torch.testing.assert_close(maps, vit.explain(model, x, method))


def test_gradient_methods_explain_the_predicted_class_unless_told_otherwise():
    model = peaked(small_cfg())
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    predicted = model(x).argmax(-1)
    for method in ("grad_rollout", "chefer"):
        torch.testing.assert_close(vit.explain(model, x, method), vit.explain(model, x, method, target=predicted))
        other = (predicted + 1) % model.num_classes
        assert not torch.allclose(vit.explain(model, x, method), vit.explain(model, x, method, target=other))


def test_explain_rejects_unknown_methods_and_out_of_range_choices():
    model = vit.VisionTransformer(small_cfg())
    x = torch.randn(1, 3, 16, 16)
    for kw in (dict(method="saliency"), dict(method="raw", layer=3), dict(method="raw", head=4)):
        with pytest.raises(ValueError):
            vit.explain(model, x, **kw)


def test_explain_names_the_options_a_method_takes_when_given_another():
    model = vit.VisionTransformer(small_cfg())
    x = torch.randn(1, 3, 16, 16)
    for method, kw, message in [
        ("chefer", dict(head_fusion="max"), "method 'chefer' takes no options; got head_fusion"),
        ("raw", dict(discard_ratio=0.5), "method 'raw' takes layer, head; got discard_ratio"),
        ("rollout", dict(layer=1, head=0), "method 'rollout' takes head_fusion, discard_ratio; got head, layer"),
    ]:
        with pytest.raises(ValueError, match=f"^{message}$"):
            vit.explain(model, x, method, **kw)


def test_head_maps_give_one_panel_per_layer_and_head():
    model = peaked(small_cfg())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    maps = head_maps(model, x)
    assert maps.shape == (2, 3, 4, 16, 16)
    torch.testing.assert_close(maps[:, 1, 2], vit.explain(model, x, "raw", layer=1, head=2))
    fig = head_grid(maps[0], image=torch.rand(3, 16, 16))
    assert len(fig.axes) == 3 * 4


def test_overlay_blends_the_colormap_over_the_image():
    heat = torch.linspace(0, 1, 8 * 10).view(8, 10)
    gray = np.full((8, 10, 3), 128, dtype=np.uint8)
    colours = matplotlib.colormaps["viridis"](heat.numpy())[..., :3] * 255
    for image in (gray, torch.from_numpy(gray).permute(2, 0, 1), Image.fromarray(gray)):
        out = vit.overlay(image, heat, cmap="viridis", alpha=1.0)
        assert isinstance(out, Image.Image) and out.size == (10, 8)
        np.testing.assert_allclose(np.asarray(out), colours, atol=0.51)
        np.testing.assert_array_equal(np.asarray(vit.overlay(image, heat, alpha=0.0)), gray)


def test_model_view_is_the_crop_the_model_saw_and_overlaying_a_wider_image_warns(tmp_path):
    model = vit.VisionTransformer(small_cfg(num_classes=3)).eval()
    config = {**model.pretrained_cfg, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3], "crop_pct": 0.9}
    path = tmp_path / "wide.png"  # resized to 16 px high, then its centre 16x16 cropped: the sides are never seen
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 60, 3), dtype=np.uint8)).save(path)
    x = Predictor(model, data_config=config).preprocess(path)[None]
    crop = create_transform(**{**config, "input_size": (3, 16, 16)}, use_prefetcher=True)(Image.open(path))  # uint8
    torch.testing.assert_close(vit.visualize.model_view(x, config)[0], crop.float() / 255, rtol=0, atol=1e-6)
    heat = vit.explain(model, x.float())[0]
    with pytest.warns(UserWarning, match=r"heat map is 16x16 and the image 60x20: .*model_view"):
        vit.overlay(Image.open(path), heat)  # stretched over parts of the image that the model never saw
    assert vit.overlay(vit.visualize.model_view(x[0], config), heat).size == (16, 16)


# -------------------------------------------------------------------------------------- faithfulness
def test_deletion_and_insertion_curves_run_between_the_image_and_the_baseline():
    model = peaked(small_cfg())
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    maps = torch.rand(3, 16, 16, dtype=torch.float64)
    probs = model(x).softmax(-1)
    target = probs.argmax(-1)
    at_baseline = model(torch.zeros_like(x)).softmax(-1)[torch.arange(3), target]
    fractions, deleted = deletion_curve(model, x, maps)
    _, inserted = insertion_curve(model, x, maps, steps=4)
    assert deleted.shape == (3, 17) and inserted.shape == (3, 5)
    torch.testing.assert_close(fractions, torch.linspace(0, 1, 17))
    torch.testing.assert_close(deleted[:, 0], probs.max(-1).values.float())
    torch.testing.assert_close(deleted[:, -1], at_baseline.float())
    torch.testing.assert_close(inserted[:, 0], at_baseline.float())
    torch.testing.assert_close(inserted[:, -1], probs.max(-1).values.float())


def test_deletion_removes_the_patches_the_map_ranks_highest_first():
    # A map that ranks one patch first: after one step exactly that patch is at the baseline.
    model = peaked(small_cfg())
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    seen = []
    model.patch_embed.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    grid = torch.zeros(1, 4, 4, dtype=torch.float64)
    grid[0, 2, 1] = 1.0
    deletion_curve(model, x, grid)
    changed = (seen[2] != x)[0].any(0)  # seen[0]: the target pass, seen[1]: nothing deleted yet
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[8:12, 4:8] = True
    assert torch.equal(changed, expected)


def test_faithfulness_scores_are_batched(digits):
    model, x, _ = digits
    model, x = copy.deepcopy(model).double(), x[:3].double()
    maps = vit.explain(model, x, "rollout")
    for score in (deletion_score, insertion_score):
        single = torch.cat([score(model, x[i : i + 1], maps[i : i + 1], steps=8) for i in range(3)])
        torch.testing.assert_close(score(model, x, maps, steps=8), single)


def test_rollout_and_chefer_delete_the_evidence_faster_than_random_maps(digits):
    model, x, y = digits
    assert (model(x).argmax(-1) == y).float().mean() > 0.8  # the model has learnt something to explain
    patch = DIGITS_VIT["patch_size"]
    random = [random_maps(x, patch, seed) for seed in range(5)]
    random_del = torch.stack([deletion_score(model, x, m, steps=8) for m in random]).mean()
    random_ins = torch.stack([insertion_score(model, x, m, steps=8) for m in random]).mean()
    for method in ("rollout", "chefer"):
        maps = vit.explain(model, x, method)
        assert deletion_score(model, x, maps, steps=8).mean() < random_del, method
        assert insertion_score(model, x, maps, steps=8).mean() > random_ins, method


# ------------------------------------------------------------------------------------ command line
@pytest.fixture
def checkpoint(tmp_path):
    model = vit.VisionTransformer(small_cfg(num_classes=3)).eval()
    path = vit.save_safetensors(model, tmp_path / "model.safetensors", class_names=["cat", "dog", "bird"])
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(image)
    return model, path, image


def test_attention_figure_frames_each_panel_so_a_white_image_edge_shows_where_the_input_ends():
    from vit.visualize import attention_figure

    white_left = torch.rand(3, 16, 16)
    white_left[:, :, :8] = 1.0  # a transparent PNG's side, composited on white, as the figure's background is
    fig = attention_figure(white_left, torch.rand(16, 16))
    image, heat, blend = fig.axes[:3]
    assert image.get_title() == "model input" and heat.get_title() == "attention"
    for ax in (image, heat, blend):
        assert ax.axison and all(spine.get_visible() for spine in ax.spines.values())
        assert not ax.get_xticks().size and not ax.get_yticks().size


def test_to_rgb_reads_a_small_torch_tensor_as_channels_first():
    from vit.visualize import to_rgb

    patch = torch.arange(16.0).view(1, 4, 4) / 15  # a grey 4-px patch, as torch holds it
    assert np.allclose(to_rgb(patch), np.repeat(patch.permute(1, 2, 0).numpy(), 3, axis=-1))
    rgb = torch.rand(3, 4, 3)  # 3 channels of 4x3 pixels
    assert to_rgb(rgb).shape == (4, 3, 3) and np.allclose(to_rgb(rgb), rgb.permute(1, 2, 0).numpy())
    assert to_rgb(np.zeros((4, 4, 3), dtype=np.uint8)).shape == (4, 4, 3)  # an HWC array stays as it is


def test_cli_attention_writes_a_png_and_prints_the_predicted_class(checkpoint, tmp_path, capsys):
    model, path, image = checkpoint
    x = create_transform(**model.pretrained_cfg)(Image.open(image).convert("RGB"))[None]
    predicted = ["cat", "dog", "bird"][model(x).argmax().item()]
    for extra in ([], ["--method", "chefer"], ["--layer", "1", "--head", "0"]):
        out = tmp_path / f"map{len(extra)}.png"
        assert vit.cli.main(["attention", str(image), "--checkpoint", str(path), "--out", str(out), *extra]) == 0
        assert f"predicted: {predicted} " in capsys.readouterr().out
        with Image.open(out) as figure:
            assert figure.format == "PNG" and figure.width > figure.height > 100


def test_cli_attention_prints_the_predicted_class_and_the_target_it_explains(checkpoint, tmp_path, capsys):
    model, path, image = checkpoint
    x = create_transform(**model.pretrained_cfg)(Image.open(image).convert("RGB"))[None]
    probs = model(x).softmax(-1)[0]
    predicted, target = int(probs.argmax()), int(probs.argmin())
    out = tmp_path / "map.png"
    args = ["attention", str(image), "-c", str(path), "--method", "chefer", "--target", str(target), "--out", str(out)]
    assert vit.cli.main(args) == 0
    names = ["cat", "dog", "bird"]
    assert capsys.readouterr().out.splitlines() == [
        f"predicted: {names[predicted]} (class {predicted}, p={probs[predicted]:.3f})",
        f"target: {names[target]} (class {target}, p={probs[target]:.3f})",
        f"wrote {out}",
    ]


def test_cli_attention_passes_head_fusion_and_discard_ratio_to_rollout(checkpoint, tmp_path, monkeypatch):
    _, path, image = checkpoint
    seen = []
    module = sys.modules["vit.explain"]
    explain = module.explain
    monkeypatch.setattr(
        module, "explain", lambda model, x, *a, **kw: seen.append((a, kw)) or explain(model, x, *a, **kw)
    )
    for method in ("rollout", "grad_rollout"):
        args = ["--method", method, "--head-fusion", "max", "--discard-ratio", "0.9", "--out", str(tmp_path / "m.png")]
        assert vit.cli.main(["attention", str(image), "-c", str(path), *args]) == 0
        (given, options) = seen[-1]
        assert given == (method,) and {k: options[k] for k in ("head_fusion", "discard_ratio")} == {
            "head_fusion": "max",
            "discard_ratio": 0.9,
        }


def test_cli_attention_reads_a_vit_fit_checkpoint(checkpoint, tmp_path, capsys):
    model, _, image = checkpoint
    data_config = {**model.pretrained_cfg, "input_size": list(model.pretrained_cfg["input_size"])}
    data_config.update(mean=list(data_config["mean"]), std=list(data_config["std"]))
    meta = {"model_config": model.cfg.to_dict(), "class_names": ["ant", "bee", "cow"], "data_config": data_config}
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "vit": {**meta, "weights_prefix": "model."}}, tmp_path / "last.ckpt")
    out = tmp_path / "map.png"
    assert vit.cli.main(["attention", str(image), "-c", str(tmp_path / "last.ckpt"), "--out", str(out)]) == 0  # -c too
    printed = capsys.readouterr().out
    assert any(f"predicted: {name} " in printed for name in ("ant", "bee", "cow"))
    assert Image.open(out).format == "PNG"


@pytest.mark.parametrize(
    "args, message",
    [
        (["{image}", "--method", "rollout", "--layer", "1"], "--method raw"),
        (["{image}", "--layer", "7"], "layer 7"),
        (["{image}", "--method", "chefer", "--target", "3"], "--target 3 is not a class index"),
        (["{image}", "--target", "1"], "--target 1: rollout maps are the same for every class"),
        (["{image}", "--method", "raw", "--target", "1"], "--method grad_rollout or chefer"),
        (["{image}", "--method", "chefer", "--head-fusion", "max"], "options of rollout and grad_rollout, not chefer"),
        (["{image}", "--discard-ratio", "1.5"], "--discard-ratio 1.5 is not in [0, 1)"),
        (["{folder}"], "is a folder: vit attention draws the map of one image file"),  # not 'holds no images'
    ],
)
def test_cli_attention_reports_user_errors_in_one_line(checkpoint, tmp_path, capsys, args, message):
    _, path, image = checkpoint
    args = [a.format(image=image, ckpt=path, folder=Path(image).parent) for a in args]
    status = vit.cli.main(["attention", *args, "--checkpoint", str(path), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("vit attention: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()


def awkward_image(kind: str, folder) -> Path:
    """An image that a plain `Image.open(...).convert('RGB')` reads differently from `vit predict`."""
    rng = np.random.default_rng(1)
    path = folder / {"exif": "rotated.jpg", "16bit": "deep.png", "alpha": "clear.png"}[kind]
    if kind == "exif":
        exif = Image.Exif()
        exif[0x0112] = 6  # shown turned 90 degrees from how it is stored
        Image.fromarray(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)).save(path, quality=95, exif=exif)
    elif kind == "16bit":  # convert('RGB') clips every sample above 255
        Image.fromarray(rng.integers(0, 65536, (30, 20), dtype=np.uint16)).save(path)
    else:  # convert('RGB') drops the alpha, showing what lies under the transparent pixels
        Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA").save(path)
    return path


@pytest.mark.parametrize("kind", ["exif", "16bit", "alpha"])
def test_cli_attention_feeds_the_model_what_predict_feeds_it(checkpoint, tmp_path, capsys, monkeypatch, kind):
    _, path, _ = checkpoint
    image = awkward_image(kind, tmp_path)
    seen = []
    module = sys.modules["vit.explain"]  # `vit.explain` is the function: the module holds the name attention imports
    explain = module.explain
    monkeypatch.setattr(module, "explain", lambda model, x, *a, **kw: seen.append(x) or explain(model, x, *a, **kw))
    assert vit.cli.main(["attention", str(image), "-c", str(path), "--out", str(tmp_path / "map.png")]) == 0
    torch.testing.assert_close(seen[0][0], Predictor.from_checkpoint(path).preprocess(image), rtol=0, atol=0)
    printed = capsys.readouterr().out
    assert vit.cli.main(["predict", str(image), "-c", str(path), "--format", "json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["predictions"][0]
    assert f"predicted: {top['label']} (class {top['index']}, p={top['prob']:.3f})" in printed


@pytest.mark.parametrize(
    "name, message",
    [("missing.png", "no such file or folder"), ("bomb.png", "too large"), ("model.safetensors", "not an image")],
)
def test_cli_attention_reports_an_unreadable_image_as_predict_does(
    checkpoint, tmp_path, capsys, monkeypatch, name, message
):
    _, path, _ = checkpoint
    Image.new("RGB", (64, 64)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 64*64 > 2 * 2000: PIL refuses it
    image = str(tmp_path / name)
    assert vit.cli.main(["predict", image, "-c", str(path), "--format", "json"]) == 1
    error = json.loads(capsys.readouterr().out)[0]["error"]
    assert message in error
    status = vit.cli.main(["attention", image, "-c", str(path), "--out", str(tmp_path / "x.png")])
    assert status == 1 and capsys.readouterr().err == f"vit attention: error: {image}: {error}\n"
    assert not (tmp_path / "x.png").exists()


def test_cli_attention_names_the_file_it_wrote_and_takes_o(checkpoint, tmp_path, capsys):
    _, path, image = checkpoint
    assert vit.cli.main(["attention", str(image), "-c", str(path), "-o", str(tmp_path / "map")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / 'map.png'}"
    with Image.open(tmp_path / "map.png") as figure:
        assert figure.format == "PNG"


def test_cli_attention_makes_the_folders_of_out_as_export_does(checkpoint, tmp_path, capsys):
    _, path, image = checkpoint
    out = tmp_path / "figures" / "today" / "map.png"
    assert vit.cli.main(["attention", str(image), "-c", str(path), "-o", str(out)]) == 0
    with Image.open(out) as figure:
        assert figure.format == "PNG"


@pytest.mark.parametrize(
    "out, message", [("", "is a folder"), ("map.xyz", "'xyz'"), ("notes.txt/map.png", "is a file, not a folder")]
)
def test_cli_attention_refuses_an_out_it_cannot_write_in_one_line(checkpoint, tmp_path, capsys, out, message):
    _, path, image = checkpoint
    folder = tmp_path / "figures"
    folder.mkdir()
    (folder / "notes.txt").write_text("a file where a folder is asked for")
    status = vit.cli.main(["attention", str(image), "-c", str(path), "--out", str(folder / out)])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("vit attention: error: ") and message in err
    assert len(err.splitlines()) == 1 and sorted(tmp_path.iterdir()) == sorted([folder, path, image])
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
