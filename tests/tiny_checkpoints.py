"""Tiny ViTs and checkpoints for the predict and export tests: a safetensors file as `vit export` writes it
and a Lightning-style .ckpt as `vit fit` writes it (the contract in COMMON.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import vit

CLASS_NAMES = ["apple", "bee", "cat", "dog", "eel"]


def tiny_model(**overrides: Any) -> vit.VisionTransformer:
    """A 2-block, 32-dim ViT on 32x32 inputs with 5 classes; seeded, so two calls give the same weights."""
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=len(CLASS_NAMES))
    return vit.VisionTransformer(vit.ViTConfig(**{**cfg, **overrides})).eval()


def data_config(model: vit.VisionTransformer, **overrides: Any) -> dict[str, Any]:
    """The model's preprocessing as plain values (what a checkpoint stores)."""
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in model.pretrained_cfg.items()}
    return {**config, **overrides}


def write_safetensors(path: Path, model: vit.VisionTransformer | None = None, **data: Any) -> Path:
    """`model` (default: the tiny one) as our safetensors, with class names and preprocessing."""
    model = model or tiny_model()
    return vit.save_safetensors(model, path, class_names=CLASS_NAMES, data_config=data_config(model, **data))


def write_lightning_ckpt(path: Path, model: vit.VisionTransformer | None = None, **data: Any) -> Path:
    """`model` as a `vit fit` .ckpt: Lightning's keys, `model.`-prefixed weights and the `vit` entry."""
    model = model or tiny_model()
    torch.save(
        {
            "epoch": 3,
            "global_step": 120,
            "pytorch-lightning_version": "2.5.0",
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "vit": {
                "model_config": model.cfg.to_dict(),
                "class_names": CLASS_NAMES,
                "data_config": data_config(model, **data),
                "weights_prefix": "model.",
            },
        },
        path,
    )
    return path


def write_timm_state_dict(path: Path, name: str = "vit_tiny_patch16_224") -> torch.nn.Module:
    """timm's own `name` with seeded random weights, saved as a bare safetensors state dict (no model config)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    save_file(model.state_dict(), str(path))
    return model
