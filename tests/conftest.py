"""Shared fixtures: timm models as the oracle, and our models holding exactly their weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import timm
import torch
from torch import nn

import vit


def perturb_(model: nn.Module, scale: float = 0.1) -> nn.Module:
    """Move every parameter off its init (LayerNorm 1/0, LayerScale 1e-5, tokens ~0), so a weight that is
    dropped, swapped or transposed changes the logits instead of hiding behind a trivial value."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def timm_and_ours(name: str, **overrides: Any) -> tuple[nn.Module, vit.VisionTransformer]:
    """A randomly initialised (and perturbed) timm model, and ours built from the same name and overrides,
    loaded with timm's state dict under strict=True; both in eval mode."""
    reference = perturb_(timm.create_model(name, pretrained=False, **overrides)).eval()
    ours = vit.create_model(name, **overrides).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def images(model: nn.Module, batch: int = 2, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A random image batch of the model's input size (or `size`)."""
    c, h, w = model.pretrained_cfg["input_size"]
    return torch.randn(batch, c, *(size or (h, w)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def pair() -> Callable[..., tuple[nn.Module, vit.VisionTransformer]]:
    """`pair(name, **overrides)` -> (timm model, our model with its weights)."""
    return timm_and_ours


@pytest.fixture
def batch_for() -> Callable[..., torch.Tensor]:
    """`batch_for(model, batch=2, size=None)` -> a random image batch the model accepts."""
    return images


@pytest.fixture
def perturb() -> Callable[..., nn.Module]:
    """`perturb(model)` moves every parameter off its init, in place."""
    return perturb_


@pytest.fixture
def tiny_pair() -> tuple[nn.Module, vit.VisionTransformer]:
    """vit_tiny_patch16_224 cut to two blocks: (timm model, ours with its weights)."""
    return timm_and_ours("vit_tiny_patch16_224", depth=2)
