"""Other layouts in timm's terms: Hugging Face ViT configs, preprocessing and state dicts, the original JAX
.npz files, and any state dict whose ViT sits under a prefix. Conversions live here and in `vit.weights`, never in
the model."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from vit.checkpoint_files import CheckpointError
from vit.model import ViTConfig

TIMM_ANCHOR = "patch_embed.proj.weight"

HF_ANCHOR = "embeddings.patch_embeddings.projection.weight"

HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}

PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # by PIL's ints

# Hugging Face model types that are a plain ViT under their own name (MAE and MSN encoders are ViTModel's weights)
HF_VIT_TYPES = ("vit", "vit_mae", "vit_msn")

HF_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")  # no defaults

# Hugging Face ViT names -> timm names, for files (transformers 4 layout, which 5 still writes) and for
# transformers 5 in-memory state dicts (`layers.N.attention.q_proj`, `o_proj`, `mlp.fc1`). Order matters.
HF_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.", r"blocks.\1."),
    (r"\.attention\.(?:output\.dense|o_proj)\.", ".attn.proj."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]

HF_QKV = re.compile(  # query/key/value (files) or q_proj/k_proj/v_proj (transformers 5)
    r"(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:attention\.)?([qkv])(?:uery|ey|alue|_proj)\.(\w+)"
)

QKV = ("query", "key", "value")

HF_DROPPED = re.compile(r"^(pooler\.|embeddings\.mask_token)")


def hf_config_to_vit(config: Mapping[str, Any], num_classes: int = 0, source: Any = "<config>") -> dict[str, Any]:
    """A Hugging Face `ViTConfig` (as a dict) in our `ViTConfig` terms, `layer_norm_eps` included."""
    act = config.get("hidden_act", "gelu")
    if act not in HF_ACTIVATIONS:
        raise CheckpointError(
            f"{source}: unsupported Hugging Face hidden_act {act!r} (supported: {', '.join(HF_ACTIVATIONS)})"
        )
    if missing := [k for k in HF_REQUIRED if k not in config]:
        raise CheckpointError(f"{source}: missing key{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}")
    patch = config.get("patch_size", 16)
    if isinstance(patch, list) and len(set(patch)) == 1:  # [16, 16]: a square patch written as a pair
        patch = patch[0]
    if isinstance(patch, list):
        raise CheckpointError(f"{source}: patch_size {patch} is not square, and vit's patches are square")
    try:
        return ViTConfig(
            img_size=config.get("image_size", 224),
            patch_size=patch,
            in_chans=config.get("num_channels", 3),
            num_classes=num_classes,
            embed_dim=config["hidden_size"],
            depth=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            mlp_ratio=config["intermediate_size"] / config["hidden_size"],
            qkv_bias=config.get("qkv_bias", True),
            norm_eps=config.get("layer_norm_eps", 1e-12),
            act_layer=HF_ACTIVATIONS[act],
        ).to_dict()
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{source}: not a valid ViT config ({e})") from None


def hf_preprocessing(
    config: Mapping[str, Any], img_size: int | tuple[int, int], in_chans: int = 3, source: Any = "<processor>"
) -> dict[str, Any]:
    """A Hugging Face `ViTImageProcessor` config (preprocessor_config.json) in timm's data-config terms."""
    # HF resizes straight to `size` (timm's 'squash' with crop_pct 1), then computes (x * rescale_factor - mean) / std
    # where timm computes (x / 255 - mean) / std: mean and std absorb the difference, and do_normalize false is 0, 1.
    # What cannot be mirrored warns and falls back rather than failing: the weights are fine, and a warning says
    # why predictions may differ slightly from transformers'.
    cannot, hw = [], (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    size = config.get("size")
    size = {"height": size, "width": size} if isinstance(size, int) else size  # older files: one int
    size = (size.get("height"), size.get("width")) if isinstance(size, Mapping) else (None, None)
    if not config.get("do_resize", True):
        cannot.append("do_resize false")
    elif all(isinstance(side, int) and side > 0 for side in size):
        hw = size
    elif config.get("size") is not None:  # e.g. {'shortest_edge': 224}: sizes that vary with the image
        cannot.append(f"size {config['size']!r}")
    if config.get("do_center_crop"):
        cannot.append("do_center_crop true")
    resample = config.get("resample", 2)
    if not isinstance(resample, int) or resample not in PIL_RESAMPLE:
        cannot.append(f"resample {resample!r}")
        resample = 2  # ViTImageProcessor's default
    if cannot:
        warnings.warn(
            f"{source}: cannot mirror {', '.join(cannot)}; using a {hw[0]}x{hw[1]} {PIL_RESAMPLE[resample]} resize "
            "instead",
            stacklevel=3,
        )

    def setting(key: str, default: Any, n: int = in_chans) -> list[float]:
        return config_numbers(config.get(key, default), n, key, source)

    scale = 255 * setting("rescale_factor", 1 / 255, 1)[0] if config.get("do_rescale", True) else 255
    normalize = config.get("do_normalize", True)
    mean, std = (
        (setting("image_mean", 0.5), setting("image_std", 0.5)) if normalize else ([0.0] * in_chans, [1.0] * in_chans)
    )
    return {
        "input_size": (in_chans, *hw),
        "interpolation": PIL_RESAMPLE[resample],
        "crop_pct": 1.0,
        "crop_mode": "squash",
        "mean": tuple(m / scale for m in mean),
        "std": tuple(s / scale for s in std),
    }


def config_numbers(value: Any, n: int, key: str, source: Any) -> list[float]:
    """`n` numbers from a config value: a list of them, or one number that serves all."""
    values = [value] * n if isinstance(value, (int, float)) else value
    if not (isinstance(values, list) and len(values) == n and all(isinstance(v, (int, float)) for v in values)):
        raise CheckpointError(f"{source}: {key} {value!r} is not " + ("a number" if n == 1 else f"{n} numbers"))
    return values


def to_timm_keys(state: dict[str, Any], source: Any, prefer_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Find the ViT inside a state dict by its patch-embedding key, strip any prefix, convert HF names."""
    for anchor in (TIMM_ANCHOR, HF_ANCHOR):
        prefixes = [k[: -len(anchor)] for k in state if isinstance(k, str) and k.endswith(anchor)]
        if not prefixes:
            continue
        prefix = prefer_prefix if prefer_prefix in prefixes else min(prefixes, key=len)
        if anchor == TIMM_ANCHOR:
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        return convert_hf_state_dict({k.removeprefix(prefix): v for k, v in state.items()}, source)
    sample = ", ".join(map(str, list(state)[:5])) or "none"
    raise CheckpointError(
        f"{source}: no ViT weights found (looked for '{TIMM_ANCHOR}' or Hugging Face's '{HF_ANCHOR}'; "
        f"first keys: {sample})"
    )


def convert_hf_state_dict(state: Mapping[str, torch.Tensor], source: Any = "<state dict>") -> dict[str, torch.Tensor]:
    """Hugging Face `ViTModel`/`ViTForImageClassification` names -> timm names, fusing q, k and v."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if HF_DROPPED.match(key):
            continue
        if match := HF_QKV.fullmatch(key):
            block, part, kind = match.groups()
            qkv.setdefault(f"blocks.{block}.attn.qkv.{kind}", {})[part] = value
            continue
        for pattern, new in HF_RENAMES:
            key = re.sub(pattern, new, key)
        out[key] = value
    for key, parts in qkv.items():
        if len(parts) != 3:
            lacking = [name for name in QKV if name[0] not in parts]
            raise CheckpointError(f"{source}: {key} lacks the attention {', '.join(lacking)} weights")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def convert_jax_npz(w: Mapping[str, np.ndarray], source: Any = "<npz>") -> dict[str, torch.Tensor]:
    """The original vit_jax / AugReg (and big_vision) .npz layout -> timm names."""
    prefix = next((p for p in ("", "opt/target/", "params/", "params/img/") if f"{p}embedding/kernel" in w), None)
    if prefix is None:
        raise CheckpointError(f"{source}: not a ViT .npz checkpoint (no 'embedding/kernel' array)")
    scanned = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in w  # blocks stacked on a leading axis
    big_vision = prefix.startswith("params/") or f"{prefix}pos_embedding" in w or scanned  # as timm decides
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    def get(name: str) -> np.ndarray:
        if prefix + name not in w:
            raise CheckpointError(f"{source}: the ViT .npz checkpoint lacks the array '{prefix + name}'")
        return w[prefix + name]

    pos = get("pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding")
    out = {
        "patch_embed.proj.weight": t(get("embedding/kernel").transpose(3, 2, 0, 1)),  # HWIO -> OIHW
        "patch_embed.proj.bias": t(get("embedding/bias")),
        "pos_embed": t(pos if pos.ndim == 3 else pos[None]),
        "norm.weight": t(get("Transformer/encoder_norm/scale")),
        "norm.bias": t(get("Transformer/encoder_norm/bias")),
    }
    if f"{prefix}cls" in w:
        out["cls_token"] = t(get("cls"))
    if f"{prefix}head/kernel" in w:
        out["head.weight"] = t(get("head/kernel").T)
        out["head.bias"] = t(get("head/bias"))

    mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
    block_ids = {m.group(1) for k in w if (m := re.match(rf"{re.escape(prefix)}Transformer/encoderblock_(\d+)/", k))}
    depth = len(get("Transformer/encoderblock/LayerNorm_0/scale")) if scanned else len(block_ids)
    dim, attn = out["norm.weight"].shape[0], f"MultiHeadDotProductAttention_{mha}"
    for i in range(depth):
        block = lambda name, i=i: (
            get(f"Transformer/encoderblock/{name}")[i] if scanned else get(f"Transformer/encoderblock_{i}/{name}")
        )
        b = f"blocks.{i}."
        out[b + "norm1.weight"] = t(block("LayerNorm_0/scale"))
        out[b + "norm1.bias"] = t(block("LayerNorm_0/bias"))
        out[b + "attn.qkv.weight"] = torch.cat([t(block(f"{attn}/{n}/kernel").reshape(dim, -1).T) for n in QKV])
        out[b + "attn.qkv.bias"] = torch.cat([t(block(f"{attn}/{n}/bias").reshape(-1)) for n in QKV])
        out[b + "attn.proj.weight"] = t(block(f"{attn}/out/kernel").reshape(-1, dim).T)  # (nh, hd, D) -> (D, D)
        out[b + "attn.proj.bias"] = t(block(f"{attn}/out/bias"))
        out[b + "norm2.weight"] = t(block(f"LayerNorm_{ln2}/scale"))
        out[b + "norm2.bias"] = t(block(f"LayerNorm_{ln2}/bias"))
        for r in (0, 1):
            out[b + f"mlp.fc{r + 1}.weight"] = t(block(f"MlpBlock_{mlp}/Dense_{r}/kernel").T)
            out[b + f"mlp.fc{r + 1}.bias"] = t(block(f"MlpBlock_{mlp}/Dense_{r}/bias"))
    return out
