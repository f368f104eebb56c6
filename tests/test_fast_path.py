"""The model's CPU fast paths: oneDNN's fused linear gives bitwise the plain path's numbers (so timm's) and aten's
gradients, and steps aside wherever it could change a result; gradient checkpointing keeps the gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch.autograd import forward_ad
from torch.profiler import profile
from torch.utils.flop_counter import FlopCounterMode

import vit
import vit.fused_linear as fused_linear

# dim 192 gives short rows (fused on AVX-512 machines); mlp_ratio 4 at dim 384 gives fc2 rows of 1536 (not fused).
CONFIGS = {
    "dim192": dict(img_size=32, patch_size=4, embed_dim=192, depth=2, num_heads=3, num_classes=10),
    "dim384": dict(img_size=64, patch_size=16, embed_dim=384, depth=2, num_heads=6, num_classes=7),
}


def pair(kw: dict) -> tuple[torch.nn.Module, vit.VisionTransformer]:
    """timm's model with every weight moved off its init, and ours holding the same weights; both in eval mode."""
    reference = TimmViT(**kw)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = vit.VisionTransformer(vit.ViTConfig(**kw))
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference.eval(), ours.eval()


def images(model: vit.VisionTransformer, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, *model.cfg.img_hw)


def fused_calls(model: torch.nn.Module, x: torch.Tensor) -> int:
    """How many times the model calls oneDNN's fused linear in one forward pass (in the current grad mode)."""
    with profile() as prof:
        model(x)
    return sum(e.name == "mkldnn::_linear_pointwise" for e in prof.events())


def layers_the_probe_accepts(rows: int, dim: int) -> int:
    """How many of a block's Linears (qkv, proj, fc1 + GELU, fc2; MLP ratio 4) may take the fused op here."""
    shapes = [(dim, 3 * dim, False), (dim, dim, False), (dim, 4 * dim, True), (4 * dim, dim, False)]
    threads = torch.get_num_threads()
    return sum(fused_linear._fuses_exactly(rows, k, n, True, gelu, threads) for k, n, gelu in shapes)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("mode", ["inference", "training"])
def test_logits_equal_timm_and_the_plain_path_bit_for_bit(name, mode, monkeypatch):
    reference, ours = pair(CONFIGS[name])
    x = images(ours)
    with torch.inference_mode(mode == "inference"):
        fast, expected = ours(x), reference(x)
        monkeypatch.setattr(fused_linear, "_HAS_FUSED_LINEAR", False)
        plain = ours(x)
    torch.testing.assert_close(fast, expected, rtol=0, atol=1e-5)
    assert torch.equal(fast, plain)


def test_inference_really_takes_the_fused_path():
    kw = CONFIGS["dim192"]
    _, ours = pair(kw)
    x = images(ours)
    accepted = layers_the_probe_accepts(x.shape[0] * 65, kw["embed_dim"]) if fused_linear._HAS_FUSED_LINEAR else 0
    if not accepted:
        pytest.skip("oneDNN and aten sum in different orders on this machine: the plain path is the only path")
    with torch.inference_mode():
        ours(x)  # the probes run (and call the op) once per shape
        assert fused_calls(ours, x) == accepted * kw["depth"]  # on AVX-512: qkv, proj and fc1, not fc2 (K = 768)
    with torch.no_grad():
        assert fused_calls(ours, x) == accepted * kw["depth"]
    ours.train()
    ours(x)  # fc1 without its GELU is another shape to probe: not inside the count (unless an earlier test probed it)
    assert fused_calls(ours, x) == accepted * kw["depth"]  # with autograd: the biases (fc1's GELU runs apart)


def test_probe_refuses_a_fused_op_that_differs(monkeypatch):
    reference, ours = pair(CONFIGS["dim192"])
    x = images(ours)
    real = fused_linear._fused_linear
    monkeypatch.setattr(fused_linear, "_fused_linear", lambda *args: real(*args) * (1 + 1e-6))
    fused_linear._fuses_exactly.cache_clear()
    try:
        with torch.inference_mode():
            ours(x)  # the probes run (and call the op) once per shape
            assert fused_calls(ours, x) == 0
            assert torch.equal(ours(x), reference(x))
    finally:
        fused_linear._fuses_exactly.cache_clear()


def test_fast_path_steps_aside_for_hooks_autocast_counters_and_export():
    kw = CONFIGS["dim192"]
    reference, ours = pair(kw)
    x = images(ours)
    seen = []
    ours.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.inference_mode():
        ours(x)
    assert seen == [(x.shape[0], 65, 4 * kw["embed_dim"])]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_calls(ours, x) == 0
        assert ours(x).dtype == torch.bfloat16  # autocast ran the Linears in bfloat16
    flops = {}
    for key, model in (("ours", ours), ("timm", reference)):
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(x)
        flops[key] = counter.get_total_flops()
    assert flops["ours"] == flops["timm"] > 0
    with torch.no_grad():
        program = torch.export.export(ours, (x,))
    assert not [n for n in program.graph.nodes if "mkldnn" in str(n.target)]


def assert_same_grads(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    theirs = dict(reference.named_parameters())
    for key, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[key].grad, rtol=1e-4, atol=1e-6, msg=key)


def test_training_gradients_match_timm():
    kw = CONFIGS["dim192"]
    reference, ours = pair(kw)
    x, y = images(ours), torch.randint(0, kw["num_classes"], (4,))
    for model in (reference.train(), ours.train()):
        F.cross_entropy(model(x), y).backward()
    assert_same_grads(ours, reference)


def test_functorch_grad_matches_timm():
    kw = CONFIGS["dim192"]
    reference, ours = pair(kw)
    x = images(ours)
    grads = []
    for model in (reference.train(), ours.train()):
        loss = lambda p, model=model: torch.func.functional_call(model, p, (x,)).logsumexp(-1).sum()
        grads.append(torch.func.grad(loss)(dict(model.named_parameters())))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_double_backward_and_forward_mode_ad_match_the_plain_path(monkeypatch):
    """A gradient penalty differentiates the backward pass; forward-mode AD needs a JVP. Torch's SDPA kernels have
    neither, so attention takes the explicit softmax path (an attention hook) here."""
    _, ours = pair(CONFIGS["dim192"])
    for block in ours.blocks:
        block.attn.attn_hook = lambda probs: None
    x, tangent = images(ours), images(ours)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(fused_linear, "_HAS_FUSED_LINEAR", fused)
        ours.zero_grad()
        xg = x.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(ours(xg).logsumexp(-1).sum(), xg, create_graph=True)
        grad_x.square().sum().backward()
        with forward_ad.dual_level():
            jvp = forward_ad.unpack_dual(ours(forward_ad.make_dual(x, tangent))).tangent
        results.append(([p.grad.clone() for p in ours.parameters()], jvp))
    (fused_grads, fused_jvp), (plain_grads, plain_jvp) = results
    torch.testing.assert_close(fused_grads, plain_grads, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused_jvp, plain_jvp, rtol=0, atol=0)


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward pass of one forward, over distinct storages, weights excluded."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return sum(seen.values())


def test_gradient_checkpointing_keeps_gradients_and_saves_only_block_inputs():
    kw = dict(CONFIGS["dim192"], depth=4)
    _, ours = pair(kw)
    ours.train()
    x, y = images(ours, batch=8), torch.randint(0, kw["num_classes"], (8,))
    plain = saved_activation_bytes(ours, x, y)
    grads = [p.grad.clone() for p in ours.parameters()]
    ours.zero_grad()
    ours.set_grad_checkpointing()
    checkpointed = saved_activation_bytes(ours, x, y)
    for p, g in zip(ours.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-6)
    block_input = x.shape[0] * 65 * kw["embed_dim"] * 4  # (B, N, D) float32
    # A block keeps about 16 tensors of its input's size (LayerNorms, qkv, attention, the 4x MLP); checkpointed, one.
    assert plain > 12 * kw["depth"] * block_input
    assert checkpointed < plain / 4
