"""The Vision Transformer: one readable file, state-dict compatible with timm's `VisionTransformer`.

PatchEmbed -> [cls, reg..] + pos -> Blocks (pre-norm attention + MLP) -> norm -> pool -> fc_norm -> head, and the
preprocessing timm uses for its ViTs (`default_data_config`). Checkpoint conversions live in `vit.weights`, never here.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, resample_abs_pos_embed, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from vit.fused_linear import linear  # act(layer(x)); oneDNN fuses bias and GELU on CPU where bitwise exact

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": partial(nn.GELU, approximate="tanh"),
    "quick_gelu": lambda: _QuickGELU(),
    "silu": nn.SiLU,
    "relu": nn.ReLU,
}
POOLS = ("token", "avg", "")


@dataclass
class ViTConfig:
    """Every hyperparameter of a ViT. Field names are timm's (`conv_stem` aside: timm has none), so
    `timm VisionTransformer(**kw)` and `VisionTransformer(ViTConfig(**kw))` build the same network."""

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "token"  # 'token' | 'avg' | '' (no pooling)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    init_values: float | None = None  # LayerScale, off when None
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False  # position embeddings cover the patches only (DeiT-3, registers)
    pre_norm: bool = False  # LayerNorm before the blocks (CLIP)
    fc_norm: bool | None = None  # final norm after pooling; None: only for 'avg', as in timm
    dynamic_img_size: bool = False  # interpolate position embeddings to any input size at run time
    conv_stem: tuple[int, ...] = ()  # channels of 3x3 stride-2 convs before the patch projection; () is timm's
    norm_eps: float = 1e-6
    act_layer: str = "gelu"
    drop_rate: float = 0.0  # before the head
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.img_size, Sequence):
            self.img_size = tuple(int(s) for s in self.img_size)  # YAML and JSON give lists
        self.conv_stem = tuple(int(c) for c in self.conv_stem)
        if self.global_pool not in POOLS:
            raise ValueError(f"global_pool must be one of {POOLS}, got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.act_layer not in ACTIVATIONS:
            raise ValueError(f"act_layer must be one of {sorted(ACTIVATIONS)}, got {self.act_layer!r}")
        if any(s % self.patch_size for s in self.img_hw):
            raise ValueError(f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}")
        if self.patch_size % 2 ** len(self.conv_stem):
            raise ValueError(f"conv_stem={list(self.conv_stem)} halves the image more often than patch_size allows")

    @property
    def img_hw(self) -> tuple[int, int]:
        s = self.img_size
        return (s, s) if isinstance(s, int) else (s[0], s[1])

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.img_hw[0] // self.patch_size, self.img_hw[1] // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the class token, if any, and the registers."""
        return int(self.class_token) + self.reg_tokens

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ViTConfig:
        """A config from plain values (YAML, JSON, a checkpoint); a key that is no field is one line, not a
        TypeError from the dataclass."""
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in fields:
                close = difflib.get_close_matches(str(key), fields, n=1)
                raise ValueError(
                    f"{key!r} is not a ViTConfig field" + (f"; did you mean {close[0]!r}?" if close else "")
                )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (lists, not tuples), safe for YAML, JSON and `weights_only` loading."""
        d = dataclasses.asdict(self)
        d["img_size"] = d["img_size"] if isinstance(d["img_size"], int) else list(d["img_size"])
        d["conv_stem"] = list(d["conv_stem"])
        return d


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _norm(cfg: ViTConfig, dim: int | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(dim or cfg.embed_dim, eps=cfg.norm_eps)


class PatchEmbed(nn.Module):
    """Image to a grid of patch tokens with one strided Conv2d (timm's `patch_embed.proj`), optionally after a
    convolutional stem: 3x3 stride-2 convs with BatchNorm and ReLU, each halving the image, so that `proj` covers
    what is left of the patch (Xiao et al., 2021: early convolutions make ViTs train faster and more stably)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = cfg.img_hw, cfg.patch_size, cfg.in_chans
        self.grid_size = cfg.grid_size
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = not cfg.dynamic_img_size
        chans = (cfg.in_chans, *cfg.conv_stem)
        convs = [
            (nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))
            for c_in, c_out in pairwise(chans)
        ]
        self.stem = nn.Sequential(*(m for conv in convs for m in conv)) if convs else nn.Identity()  # no timm keys
        p = cfg.patch_size // 2 ** len(cfg.conv_stem)
        self.proj = nn.Conv2d(chans[-1], cfg.embed_dim, p, stride=p, bias=not cfg.pre_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.proj(self.stem(x)).permute(0, 2, 3, 1)  # (B, gh, gw, D)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected an image batch of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        hw = tuple(x.shape[-2:])
        if self.strict_img_size and hw != self.img_size:
            raise ValueError(
                f"expected input of shape (B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}), "
                f"got {tuple(x.shape)}; build the model with dynamic_img_size=True for other sizes"
            )
        if hw[0] % self.patch_size or hw[1] % self.patch_size:
            raise ValueError(f"input size {hw} is not divisible by patch_size={self.patch_size}")


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """SDPA; on CPU, bfloat16/float16 inputs (autocast, bf16-mixed) run it in float32 while gradients are on: torch's
    reduced-precision CPU kernel has a backward several times slower (`cifar10_cpu.yaml` steps: 730 vs 1236 img/s)."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled():
        with torch.autocast("cpu", enabled=False):  # autocast would cast the float32 inputs straight back
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


class Attention(nn.Module):
    """Multi-head self-attention through SDPA; an explicit softmax path runs only while `attn_hook` is set,
    so that `vit.record_attention` can see (and keep gradients of) the probabilities."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        head_dim = cfg.embed_dim // cfg.num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.q_norm = _norm(cfg, head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = _norm(cfg, head_dim) if cfg.qk_norm else nn.Identity()
        self.attn_drop = cfg.attn_drop_rate
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.proj_drop = nn.Dropout(cfg.proj_drop_rate)
        self.attn_hook: Callable[[torch.Tensor], None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Split along the `three` axis of (B, N, 3, nh, hd), not a leading one: the gradient of that split is then
        # stacked straight into qkv's own layout, which saves a copy per block in the backward pass.
        qkv = rearrange(linear(x, self.qkv), "b n (three h d) -> b n three h d", three=3, h=self.num_heads)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, nh, N, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        drop = self.attn_drop if self.training else 0.0
        if self.attn_hook is None:
            x = scaled_dot_product_attention(q, k, v, drop)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, nh, N, N)
            self.attn_hook(attn)
            x = F.dropout(attn, drop, self.training) @ v
        x = rearrange(x, "b h n d -> b n (h d)")
        return self.proj_drop(linear(x, self.proj))


class Mlp(nn.Module):
    """fc1 -> activation -> fc2, each followed by dropout."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.act = ACTIVATIONS[cfg.act_layer]()
        self.drop1 = nn.Dropout(cfg.proj_drop_rate)
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)
        self.drop2 = nn.Dropout(cfg.proj_drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(linear(self.drop1(linear(x, self.fc1, self.act)), self.fc2))


class LayerScale(nn.Module):
    """A learned per-channel scale of a residual branch (CaiT), starting at `init_values`."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), each with LayerScale and drop
    path."""

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0):
        super().__init__()
        scale = partial(LayerScale, cfg.embed_dim, cfg.init_values) if cfg.init_values else nn.Identity
        self.norm1 = _norm(cfg)
        self.attn = Attention(cfg)
        self.ls1 = scale()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = _norm(cfg)
        self.mlp = Mlp(cfg)
        self.ls2 = scale()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    """An encoder-only Transformer over image patches (Dosovitskiy et al., 2020), read out from a class token or
    the mean of the patch tokens."""

    def __init__(self, cfg: ViTConfig | None = None, **overrides: Any):
        super().__init__()
        cfg = ViTConfig.from_dict({**dataclasses.asdict(cfg or ViTConfig()), **overrides})
        self.cfg = cfg
        dim = cfg.embed_dim
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, dim)) if cfg.reg_tokens else None
        embed_len = self.patch_embed.num_patches + (0 if cfg.no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, dim))
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        self.norm_pre = _norm(cfg) if cfg.pre_norm else nn.Identity()
        drop_path = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()  # grows with depth
        self.blocks = nn.Sequential(*(Block(cfg, dp) for dp in drop_path))
        use_fc_norm = cfg.global_pool == "avg" if cfg.fc_norm is None else cfg.fc_norm
        self.norm = nn.Identity() if use_fc_norm else _norm(cfg)
        self.fc_norm = _norm(cfg) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        # Preprocessing in timm's `pretrained_cfg` form, so timm.data.resolve_data_config(model=...) works.
        self.pretrained_cfg: dict[str, Any] = default_data_config(cfg)
        self.init_weights()

    @property
    def num_classes(self) -> int:
        """Outputs of the head; 0 when there is none."""
        return self.cfg.num_classes

    @property
    def embed_dim(self) -> int:
        """Token width D (timm's `num_features` too)."""
        return self.cfg.embed_dim

    num_features = embed_dim

    def init_weights(self) -> None:
        """timm's default ('') init: truncated normal for position embeddings and Linear weights."""
        trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        B, gh, gw, D = x.shape
        pos_embed = self.pos_embed
        if (gh, gw) != self.patch_embed.grid_size:  # only reachable with dynamic_img_size
            prefix = 0 if self.cfg.no_embed_class else self.num_prefix_tokens
            pos_embed = resample_abs_pos_embed(pos_embed, [gh, gw], list(self.patch_embed.grid_size), prefix)
        x = x.reshape(B, gh * gw, D)
        prefix_tokens = [t.expand(B, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.cfg.no_embed_class:
            x = torch.cat([*prefix_tokens, x + pos_embed], dim=1)
        else:
            x = torch.cat([*prefix_tokens, x], dim=1) + pos_embed
        return self.pos_drop(x)  # (B, N, D), N = prefix + gh * gw

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_pre(self._pos_embed(self.patch_embed(x)))

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, N, D), prefix tokens first."""
        x = self._embed(x)
        for block in self.blocks:
            x = self._run_block(block, x)
        return self.norm(x)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        """Tokens (B, N, D) -> (B, D): the class token ('token') or the patch mean ('avg'); '' keeps every token.
        `pool_type` defaults to the config's `global_pool`."""
        pool_type = self.cfg.global_pool if pool_type is None else pool_type
        if pool_type == "token":
            return x[:, 0]
        if pool_type == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, N, D) -> logits (B, num_classes), or the pooled features when `pre_logits`."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_prefix_tokens: bool = False,
        stop_early: bool = False,
    ) -> list[Any] | tuple[torch.Tensor, list[Any]]:
        """Block outputs as in timm: `indices` is the last n blocks (int), chosen blocks, or all (None).
        Returns (final tokens, intermediates) or only the intermediates; NCHW maps drop the prefix tokens."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = _take_indices(len(self.blocks), indices)
        H, W = x.shape[-2:]
        gh, gw = H // self.cfg.patch_size, W // self.cfg.patch_size
        x = self._embed(x)
        last = max(take) if stop_early else len(self.blocks) - 1
        outputs = []
        for i, block in enumerate(self.blocks[: last + 1]):
            x = self._run_block(block, x)
            if i in take:
                y = self.norm(x) if norm else x
                prefix, y = y[:, : self.num_prefix_tokens], y[:, self.num_prefix_tokens :]
                if output_fmt == "NCHW":
                    y = rearrange(y, "b (h w) d -> b d h w", h=gh, w=gw).contiguous()
                outputs.append((y, prefix) if return_prefix_tokens else y)
        if intermediates_only:
            return outputs
        return self.norm(x), outputs

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh head for `num_classes` outputs (0 for none), optionally with another pooling."""
        changes: dict[str, Any] = {"num_classes": num_classes}
        if global_pool is not None:
            changes["global_pool"] = global_pool
            changes["fc_norm"] = not isinstance(self.fc_norm, nn.Identity)  # keep the norm where it is
        self.cfg = dataclasses.replace(self.cfg, **changes)
        old = self.head.weight if isinstance(self.head, nn.Linear) else self.pos_embed
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head.to(device=old.device, dtype=old.dtype).train(self.training)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameters that AdamW should not decay (timm's optimizer factory reads this)."""
        return {"pos_embed", "cls_token", "reg_token"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups by depth, as timm defines them, for layer-wise learning-rate decay."""
        return dict(
            stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )


def default_data_config(cfg: ViTConfig) -> dict[str, Any]:
    """The preprocessing timm uses for its ViTs (mean/std 0.5, bicubic, crop 0.9), at this input size."""
    return {
        "input_size": (cfg.in_chans, *cfg.img_hw),
        "interpolation": "bicubic",
        "mean": (0.5,) * cfg.in_chans,
        "std": (0.5,) * cfg.in_chans,
        "crop_pct": 0.9,
        "crop_mode": "center",
    }


def fit_channels(config: dict[str, Any], in_chans: int) -> dict[str, tuple[float, ...]]:
    """`mean` and `std` for `in_chans` channels: an RGB model's average serves a grey one (timm would hand three
    values to a one-channel Normalize, which fails)."""
    out = {}
    for key in ("mean", "std"):
        values = tuple(config[key])
        out[key] = values if len(values) == in_chans else (sum(values) / len(values),) * in_chans
    return out


def _take_indices(depth: int, indices: int | Sequence[int] | None) -> list[int]:
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"indices={indices} must be between 1 and depth={depth}")
        return list(range(depth - indices, depth))
    take = [i % depth for i in indices]
    if any(not -depth <= i < depth for i in indices):
        raise ValueError(f"block indices {list(indices)} out of range for depth={depth}")
    return take
