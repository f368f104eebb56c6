"""Attention maps: record the softmax probabilities, then turn them into (B, H, W) heat maps in [0, 1].

Methods (all batched; each image's map depends on that image only):
- 'raw': one layer's attention (one head, or the mean over heads) from the read-out token(s) to the patches.
- 'rollout': attention rollout (Abnar & Zuidema 2020): fuse heads, optionally discard the weakest weights,
  add the residual (0.5 A + 0.5 I), normalise rows, multiply through the layers.
- 'grad_rollout': rollout of the gradient-weighted attention (mean_h(∇A ⊙ A))⁺, class-specific, as in
  jacobgil/vit-explain (whose row normalisation lacks keepdim; here rows are normalised, as in the paper).
- 'chefer': generic relevance of Chefer et al. (ICCV 2021): R ← R + mean_h((∇A ⊙ A)⁺) · R from R = I.

Every method produces a token-to-token matrix (B, N, N) whose rows are queries and columns keys. The map is
read from the rows of the token(s) the head pools: the class token for `global_pool='token'`, the mean of
the patch rows for average-pooled models (with or without a class token). Only the patch columns are kept,
so register tokens and the class token never appear in a map.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vit.model import Attention, VisionTransformer

HEAD_FUSIONS = ("mean", "max", "min")
Target = int | Sequence[int] | torch.Tensor | None


# ------------------------------------------------------------------------------------------- recording
class AttentionRecorder:
    """What `record_attention` yields. `maps` holds one (B, heads, N, N) softmax tensor per block, in block
    order, for the latest forward pass: the list is replaced whenever the first block runs again."""

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def hook(attn: torch.Tensor) -> None:
            if index == 0:  # a new forward pass starts
                self.maps = []
            if attn.requires_grad:  # keep `.grad` after backward() for gradient methods
                attn.retain_grad()
            self.maps.append(attn)

        return hook

    @property
    def grads(self) -> list[torch.Tensor | None]:
        """The `.grad` of each map after a backward pass (None where no gradient reached it)."""
        return [a.grad for a in self.maps]


@contextmanager
def record_attention(model: nn.Module) -> Iterator[AttentionRecorder]:
    """Record the attention probabilities of every block of `model` (a ViT or a module holding one).

    While recording, attention runs its explicit softmax path instead of SDPA (same logits), the maps stay in
    the autograd graph, and gradient checkpointing is paused (its recomputation would record twice). Hooks
    and checkpointing are restored on exit, also after an error.
    """
    owners = [m for m in model.modules() if isinstance(m, VisionTransformer)] or [model]
    # Index blocks within their own ViT, so that a module holding two (an EMA copy) records whichever runs.
    hooked = [(i, a) for o in owners for i, a in enumerate(m for m in o.modules() if isinstance(m, Attention))]
    if not hooked:
        raise ValueError(f"{type(model).__name__} has no vit.model.Attention modules to record")
    saved_hooks = [a.attn_hook for _, a in hooked]
    vits = [m for m in owners if isinstance(m, VisionTransformer)]
    saved_ckpt = [v.grad_checkpointing for v in vits]
    rec = AttentionRecorder()
    try:
        for i, a in hooked:
            a.attn_hook = rec._hook(i)
        for v in vits:
            v.grad_checkpointing = False
        yield rec
    finally:
        for (_, a), hook in zip(hooked, saved_hooks):
            a.attn_hook = hook
        for v, ckpt in zip(vits, saved_ckpt):
            v.grad_checkpointing = ckpt


# ------------------------------------------------------------------ pure functions on lists of maps
def fuse_heads(attn: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """(B, heads, N, N) -> (B, N, N) by the mean, max or min over heads."""
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if head_fusion == "mean":
        return attn.mean(1)
    return attn.amax(1) if head_fusion == "max" else attn.amin(1)


def _float(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))  # half-precision products lose the small weights


def rollout(maps: Sequence[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of per-block (B, heads, N, N) maps -> (B, N, N).

    Row i of the result says how much output token i draws on each input token through all blocks.
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    if not maps:
        raise ValueError("rollout needs at least one attention map")
    B, _, N, _ = maps[0].shape
    eye = torch.eye(N, device=maps[0].device, dtype=_float(maps[0]).dtype)
    joint = eye.expand(B, N, N)
    for attn in maps:
        a = fuse_heads(_float(attn), head_fusion)  # (B, N, N), rows: queries, columns: keys
        if discard_ratio > 0:  # drop the weakest weights of each image (noise), keep the rest
            flat = a.flatten(1)
            weakest = flat.topk(int(flat.shape[1] * discard_ratio), dim=1, largest=False).indices
            a = flat.scatter(1, weakest, 0.0).view_as(a)
        a = 0.5 * a + 0.5 * eye  # the residual connection carries the token itself
        a = a / a.sum(dim=-1, keepdim=True)  # each query's weights over the keys sum to 1
        joint = a @ joint  # later blocks act on the outputs of earlier ones: A_L ... A_2 A_1
    return joint


def gradient_weighted(maps: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """(∇A ⊙ A)⁺ per block and head: the attention weights that raise the target logit."""
    if len(maps) != len(grads):
        raise ValueError(f"got {len(maps)} attention maps but {len(grads)} gradients")
    return [(_float(g) * _float(a)).clamp(min=0) for a, g in zip(maps, grads)]


def chefer_relevance(maps: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Generic attention-model relevance (Chefer et al., ICCV 2021) -> (B, N, N): R ← R + mean_h((∇A ⊙ A)⁺) R."""
    weighted = gradient_weighted(maps, grads)
    B, _, N, _ = weighted[0].shape
    relevance = torch.eye(N, device=weighted[0].device, dtype=weighted[0].dtype).expand(B, N, N)
    for cam in weighted:
        relevance = relevance + cam.mean(1) @ relevance
    return relevance


# -------------------------------------------------------------------------------------------- methods
def _raw(maps, grads, layer: int = -1, head: int | None = None) -> torch.Tensor:
    if not -len(maps) <= layer < len(maps):
        raise ValueError(f"layer {layer} is out of range for a model with {len(maps)} blocks")
    attn = _float(maps[layer])
    if head is None:
        return attn.mean(1)
    if not -attn.shape[1] <= head < attn.shape[1]:
        raise ValueError(f"head {head} is out of range for a model with {attn.shape[1]} heads")
    return attn[:, head]


def _rollout(maps, grads, head_fusion: str = "mean", discard_ratio: float = 0.0) -> torch.Tensor:
    return rollout(maps, head_fusion, discard_ratio)


def _grad_rollout(maps, grads, head_fusion: str = "mean", discard_ratio: float = 0.0) -> torch.Tensor:
    # jacobgil/vit-explain's rule: fuse the heads of ∇A ⊙ A, then clamp, (fuse_h(∇A ⊙ A))⁺. For 'max' and 'min'
    # that equals fusing the clamped heads; for 'mean' a head's negative product offsets another's positive one.
    fused = [fuse_heads(_float(g) * _float(a), head_fusion).clamp(min=0)[:, None] for a, g in zip(maps, grads)]
    return rollout(fused, "mean", discard_ratio)  # one head left: fusing it again changes nothing


def _chefer(maps, grads) -> torch.Tensor:
    return chefer_relevance(maps, grads)


# name -> (needs gradients, (maps, grads, **options) -> token-to-token matrix (B, N, N))
METHODS: dict[str, tuple[bool, Callable[..., torch.Tensor]]] = {
    "raw": (False, _raw),
    "rollout": (False, _rollout),
    "grad_rollout": (True, _grad_rollout),
    "chefer": (True, _chefer),
}


# -------------------------------------------------------------------------------------- the front end
def find_vit(model: nn.Module) -> VisionTransformer:
    """The `VisionTransformer` itself, or the first one inside a wrapper (a LightningModule)."""
    vit = next((m for m in model.modules() if isinstance(m, VisionTransformer)), None)
    if vit is None:
        raise ValueError(f"{type(model).__name__} holds no vit.VisionTransformer")
    return vit


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` in eval mode (no dropout, no drop path) and restore its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def resolve_targets(logits: torch.Tensor, target: Target) -> torch.Tensor:
    """Target classes (B,): the predicted ones for None, else an int or one class per image."""
    B, C = logits.shape
    if target is None:
        return logits.argmax(-1)
    t = torch.as_tensor(target, device=logits.device, dtype=torch.long).reshape(-1)
    t = t.expand(B) if t.numel() == 1 else t
    if t.numel() != B or not ((t >= 0) & (t < C)).all():
        raise ValueError(f"target must be a class index in [0, {C}) or one per image, got {target}")
    return t


def attention_and_grads(
    model: nn.Module, x: torch.Tensor, target: Target = None, *, grads: bool = True
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, torch.Tensor]:
    """One forward pass (eval mode): the detached maps, their gradients w.r.t. the target logits (summed over
    the batch, which keeps images independent) and the logits."""
    grad_list = None
    # Autograd is on for the whole pass and the target's score, also under torch.no_grad() or inference_mode().
    autograd = torch.inference_mode(False) if grads else nullcontext()
    with eval_mode(model), record_attention(model) as rec, autograd, torch.set_grad_enabled(grads):
        # The input carries the graph, so gradients reach the maps even when the weights are frozen (a clone of
        # a tensor made under inference_mode can require grad; the tensor itself cannot).
        logits = model((x.clone() if x.is_inference() else x.detach()).requires_grad_(grads))
        if grads:
            score = logits.gather(1, resolve_targets(logits, target)[:, None]).sum()
            g = torch.autograd.grad(score, rec.maps, allow_unused=True)
            grad_list = [torch.zeros_like(a) if gi is None else gi for a, gi in zip(rec.maps, g)]
    return [a.detach() for a in rec.maps], grad_list, logits.detach()


def readout(matrix: torch.Tensor, vit: VisionTransformer) -> torch.Tensor:
    """(..., N, N) token-to-token matrix -> (..., num_patches): the rows the head pools, the patch columns."""
    prefix = vit.num_prefix_tokens
    if vit.cfg.class_token and vit.cfg.global_pool != "avg":
        rows = matrix[..., 0, :]
    else:  # the head averages the patch tokens, so their rows together explain the output
        rows = matrix[..., prefix:, :].mean(-2)
    return rows[..., prefix:]


def to_heatmap(scores: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(..., gh*gw) patch scores -> (..., H, W): bilinear upsampling, then min-max to [0, 1] per map (a
    constant map becomes all zeros)."""
    lead = scores.shape[:-1]
    m = F.interpolate(scores.reshape(-1, 1, *grid), size=size, mode="bilinear", align_corners=False)
    flat = m.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    flat = (flat - lo) / (hi - lo).clamp_min(torch.finfo(flat.dtype).tiny)
    return flat.reshape(*lead, *size)


def _grid(vit: VisionTransformer, x: torch.Tensor) -> tuple[int, int]:
    p = vit.cfg.patch_size
    return x.shape[-2] // p, x.shape[-1] // p


def explain(
    model: nn.Module, x: torch.Tensor, method: str = "rollout", target: Target = None, **kw: Any
) -> torch.Tensor:
    """Heat maps (B, H, W) in [0, 1] at input resolution; `target` (gradient methods only; a warning otherwise)
    defaults to the predicted class. Options: raw `layer=-1, head=None`; (grad_)rollout `head_fusion='mean',
    discard_ratio=0`."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    needs_grad, fn = METHODS[method]
    options = [name for name in inspect.signature(fn).parameters if name not in ("maps", "grads")]
    if unknown := sorted(set(kw) - set(options)):
        takes = f"takes {', '.join(options)}" if options else "takes no options"
        raise ValueError(f"method {method!r} {takes}; got {', '.join(unknown)}")
    if target is not None and not needs_grad:  # stacklevel 2: the warning names the caller's line
        warnings.warn(f"{method} maps are the same for every class: target is not used", stacklevel=2)
    vit = find_vit(model)
    maps, grads, _ = attention_and_grads(model, x, target, grads=needs_grad)
    scores = readout(fn(maps, grads, **kw), vit)  # (B, num_patches)
    return to_heatmap(scores, _grid(vit, x), tuple(x.shape[-2:]))


def head_maps(model: nn.Module, x: torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor:
    """Raw maps of every head: (B, layers, heads, H, W) in [0, 1], for `head_grid`."""
    vit = find_vit(model)
    maps, _, _ = attention_and_grads(model, x, grads=False)
    chosen = range(len(maps)) if layers is None else layers
    stacked = torch.stack([_float(maps[i]) for i in chosen], dim=1)  # (B, L, heads, N, N)
    return to_heatmap(readout(stacked, vit), _grid(vit, x), tuple(x.shape[-2:]))
