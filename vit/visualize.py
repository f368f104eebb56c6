"""Heat maps as pictures: a colormap over the image (`overlay`), a grid of every head's map (`head_grid`) and
the image / map / overlay figure of `vit attention` (`attention_figure`). A map covers what the model saw, the
resized and centre-cropped input: `model_view` turns that input back into the picture to overlay it on.

Figures are built as `matplotlib.figure.Figure` objects, without pyplot, so nothing depends on (or changes) the
global backend; Jupyter still displays them, and `fig.savefig` writes them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ImageLike = Image.Image | torch.Tensor | np.ndarray


def to_rgb(image: ImageLike) -> np.ndarray:
    """A PIL image, or a CHW / HWC / HW tensor or array -> (H, W, 3) float array in [0, 1].

    A torch tensor with 1 or 3 leading channels is CHW, as torch lays images out (a 4-px patch (1, 4, 4) too);
    other tensors and arrays with 1, 3 or 4 leading channels and a larger last axis are read as CHW. uint8 values
    are divided by 255; float values outside [0, 1] (a normalised tensor) are min-max rescaled for display.
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    torch_chw = isinstance(image, torch.Tensor) and a.ndim == 3 and a.shape[0] in (1, 3)
    if torch_chw or (a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4)):
        a = a.transpose(1, 2, 0)  # CHW -> HWC
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image of shape (C, H, W), (H, W, C) or (H, W), got {image.shape}")
    if a.dtype == np.uint8:
        a = a / 255.0
    a = a.astype(np.float32)
    if a.min() < 0 or a.max() > 1:
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a[..., :3]


def model_view(x: torch.Tensor, data_config: Mapping[str, Any]) -> torch.Tensor:
    """Normalised model input(s) (..., C, H, W) back to pixels in [0, 1] by the config's mean and std: the crop the
    model saw, which its heat maps line up with (the file itself may be larger, or wider, than that crop)."""
    mean, std = (
        torch.as_tensor(data_config[k], dtype=x.dtype, device=x.device).view(-1, 1, 1) for k in ("mean", "std")
    )
    return (x.detach() * std + mean).clamp(0, 1)


def _heat(heatmap: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) heat map in [0, 1] resized (bilinear) to `size` = (H, W)."""
    h = heatmap.detach().cpu().float().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    h = np.squeeze(h).astype(np.float32)
    if h.ndim != 2:
        raise ValueError(f"expected one heat map of shape (H, W), got {tuple(np.shape(heatmap))}")
    if h.shape != size:
        h = np.asarray(Image.fromarray(h, mode="F").resize(size[::-1], Image.BILINEAR))
    return np.clip(h, 0.0, 1.0)


def overlay(image: ImageLike, heatmap: torch.Tensor | np.ndarray, cmap: str = "jet", alpha: float = 0.5) -> Image.Image:
    """The image with a matplotlib colormap of `heatmap` (values in [0, 1]) blended over it, as a PIL image."""
    import matplotlib

    rgb = to_rgb(image)
    (h, w), (mh, mw) = rgb.shape[:2], np.shape(heatmap)[-2:]
    if abs(h * mw - w * mh) > max(h, w, mh, mw):  # aspect ratios more than a pixel's rounding apart: stretched
        warnings.warn(
            f"overlay: the heat map is {mw}x{mh} and the image {w}x{h}: the map covers the model's centre crop, not "
            "the whole image; overlay it on vit.visualize.model_view(x, data_config), the input it was made from",
            stacklevel=2,
        )
    colour = matplotlib.colormaps[cmap](_heat(heatmap, rgb.shape[:2]))[..., :3]
    blended = (1.0 - alpha) * rgb + alpha * colour
    return Image.fromarray(np.round(blended * 255).astype(np.uint8))


def head_grid(
    maps: torch.Tensor,
    image: ImageLike | None = None,
    *,
    layers: Sequence[int] | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    size: float = 1.6,
) -> Figure:
    """A grid of heat maps (layers, heads, H, W) (one image of `vit.explain.head_maps`): a row per layer,
    a column per head, overlaid on `image` when given."""
    from matplotlib.figure import Figure

    if maps.ndim != 4:
        raise ValueError(f"expected maps of shape (layers, heads, H, W), got {tuple(maps.shape)}")
    L, heads = maps.shape[:2]
    labels = list(range(L)) if layers is None else list(layers)
    fig = Figure(figsize=(size * heads, size * L), layout="constrained")
    axes = fig.subplots(L, heads, squeeze=False)
    for i in range(L):
        for j in range(heads):
            ax = axes[i, j]
            if image is None:
                ax.imshow(maps[i, j].detach().cpu().numpy(), cmap=cmap, vmin=0, vmax=1)
            else:
                ax.imshow(overlay(image, maps[i, j], cmap=cmap, alpha=alpha))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"head {j}", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"layer {labels[i]}", fontsize=9)
    return fig


def attention_figure(
    image: ImageLike, heatmap: torch.Tensor | np.ndarray, *, title: str = "", map_title: str = "attention", **kw: Any
) -> Figure:
    """Three panels: the image, the heat map and the overlay (`kw` goes to `overlay`)."""
    from matplotlib.figure import Figure

    rgb = to_rgb(image)
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].imshow(rgb)
    axes[0].set_title("model input")
    shown = axes[1].imshow(_heat(heatmap, rgb.shape[:2]), cmap=kw.get("cmap", "jet"), vmin=0, vmax=1)
    axes[1].set_title(map_title)
    fig.colorbar(shown, ax=axes[1], fraction=0.046)
    axes[2].imshow(overlay(rgb, heatmap, **kw))
    axes[2].set_title("overlay")
    for ax in axes:  # ticks off, frames kept: white or transparent edges of the image still show where it ends
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return fig
