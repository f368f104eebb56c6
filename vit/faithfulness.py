"""Faithfulness of heat maps: deletion and insertion curves (Petsiuk et al. 2018, RISE) at patch granularity.

Deletion replaces the patches a map ranks most relevant first with a baseline and follows the probability
of the target class: a faithful map makes it fall fast (low area under the curve). Insertion starts from the
baseline image and puts the most relevant patches back first: a faithful map makes it rise fast (high area).

The baseline is 'zero' by default: zeros in normalised input space, which is the mean colour of the
normalisation statistics (the data set's average pixel), so removed patches carry no signal. 'mean' uses each
image's own per-channel mean instead; a tensor broadcastable to the input is used as given.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vit.explain import Target, eval_mode, find_vit, resolve_targets


def patch_scores(maps: torch.Tensor, x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Heat maps at input resolution (B, H, W) or on the patch grid (B, gh, gw) -> (B, gh*gw) per patch."""
    grid = (x.shape[-2] // patch_size, x.shape[-1] // patch_size)
    if maps.ndim != 3 or maps.shape[0] != x.shape[0]:
        raise ValueError(f"maps must be (B, H, W) with B={x.shape[0]}, got {tuple(maps.shape)}")
    if tuple(maps.shape[-2:]) == grid:
        return maps.flatten(1).float()
    if maps.shape[-2:] == x.shape[-2:]:
        return F.avg_pool2d(maps[:, None].float(), patch_size).flatten(1)
    raise ValueError(
        f"maps of size {tuple(maps.shape[-2:])} fit neither the input {tuple(x.shape[-2:])} nor the grid {grid}"
    )


def _baseline(x: torch.Tensor, baseline: str | torch.Tensor) -> torch.Tensor:
    if isinstance(baseline, torch.Tensor):
        return baseline.to(x).expand_as(x)
    if baseline == "zero":
        return torch.zeros_like(x)
    if baseline == "mean":
        return x.mean(dim=(-2, -1), keepdim=True).expand_as(x)
    raise ValueError(f"baseline must be 'zero', 'mean' or a tensor, got {baseline!r}")


@torch.no_grad()
def perturbation_curve(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    target: Target = None,
    *,
    mode: str = "deletion",
    steps: int | None = None,
    baseline: str | torch.Tensor = "zero",
    patch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target-class probability as patches are deleted from (or inserted into) the images, most relevant first.

    Returns (fractions (S+1,), probabilities (B, S+1)): the fraction of patches changed at each step, from 0
    to 1. `steps=None` changes one patch per step; `target=None` uses the class predicted on `x`.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    p = patch_size or find_vit(model).cfg.patch_size
    scores = patch_scores(maps.to(x.device), x, p)  # (B, P)
    B, P = scores.shape
    steps = P if steps is None else min(int(steps), P)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    # rank[b, j] = position of patch j in image b's order, most relevant first (ties: lower index first)
    order = scores.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(P, device=x.device).expand(B, P))
    base = _baseline(x, baseline)
    counts = torch.linspace(0, P, steps + 1, device=x.device).round().long()
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    with eval_mode(model):
        t = resolve_targets(model(x), target)[:, None]  # the unperturbed image decides the predicted class
        curve = []
        for n in counts:
            changed = (rank < n).view(B, 1, *grid)  # patches deleted (or inserted) so far
            changed = changed.repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1)
            images = torch.where(changed, base, x) if mode == "deletion" else torch.where(changed, x, base)
            curve.append(model(images).float().softmax(-1).gather(1, t).squeeze(1))
    return counts.float() / P, torch.stack(curve, dim=1)


def area_under_curve(fractions: torch.Tensor, curve: torch.Tensor) -> torch.Tensor:
    """Trapezoidal area under (B, S+1) curves over the fractions -> (B,)."""
    return torch.trapezoid(curve, fractions, dim=-1)


def deletion_curve(
    model: nn.Module, x: torch.Tensor, maps: torch.Tensor, target: Target = None, **kw: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities as the most relevant patches are removed first: (fractions (S+1,), curve (B, S+1))."""
    return perturbation_curve(model, x, maps, target, mode="deletion", **kw)


def insertion_curve(
    model: nn.Module, x: torch.Tensor, maps: torch.Tensor, target: Target = None, **kw: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities as the most relevant patches are put back first: (fractions (S+1,), curve (B, S+1))."""
    return perturbation_curve(model, x, maps, target, mode="insertion", **kw)


def deletion_score(
    model: nn.Module, x: torch.Tensor, maps: torch.Tensor, target: Target = None, **kw: Any
) -> torch.Tensor:
    """Area under the deletion curve per image (B,); lower means a more faithful map."""
    return area_under_curve(*deletion_curve(model, x, maps, target, **kw))


def insertion_score(
    model: nn.Module, x: torch.Tensor, maps: torch.Tensor, target: Target = None, **kw: Any
) -> torch.Tensor:
    """Area under the insertion curve per image (B,); higher means a more faithful map."""
    return area_under_curve(*insertion_curve(model, x, maps, target, **kw))
