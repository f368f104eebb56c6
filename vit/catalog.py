"""What `vit models` prints: the variants of ours with their sizes and timm tags, or, for a pattern none of ours
matches, timm's ViT names that do."""

from __future__ import annotations

import timm
import torch
from rich.console import Console
from rich.table import Table

from vit.checkpoint_files import short_list
from vit.factory import list_models, model_config, timm_tags
from vit.model import VisionTransformer, ViTConfig


def print_models(pattern: str = "*") -> int:
    """Print the variants matching `pattern` as a table (size, input, patch, width, depth, heads, timm tag), or
    timm's ViT names that match when none of ours does; 0, or ValueError when nothing matches."""
    names = list_models(pattern)
    if not names:
        return _timm_vit_names(pattern)
    header = ("name", "params", "input", "patch", "dim", "depth", "heads", "pretrained (timm tag)")
    table = Table(*header, box=None, pad_edge=False)
    for name in names:
        cfg = model_config(name)
        tags = timm_tags(name)  # none: a name of our own or an untrained timm architecture, so no pretrained=True
        table.add_row(
            name,
            f"{_count_params(cfg) / 1e6:.1f}M",
            "x".join(map(str, cfg.img_hw)),
            str(cfg.patch_size),
            str(cfg.embed_dim),
            str(cfg.depth),
            str(cfg.num_heads),
            tags[0].split(".", 1)[1] if tags else "-",
        )
    Console(width=100).print(table)
    print("'-': timm has no weights for the name; other tags: timm.list_pretrained('NAME.*')")
    print("timm's other ViT names work too (deit3_*, *_dinov2, *_clip_*, ...): timm.list_models('PATTERN')")
    return 0


def _timm_vit_names(pattern: str) -> int:
    """For a pattern no variant of ours matches: timm's ViT names that do, which work where a variant name does."""
    theirs = sorted({n for module in ("vision_transformer", "deit") for n in timm.list_models(pattern, module=module)})
    if not theirs:
        raise ValueError(f"no model matches {pattern!r}")
    print(
        f"no variant of vit's own matches {pattern!r}; {len(theirs)} of timm's ViT names do: {short_list(theirs, 6)}. "
        "Each works where a variant name does (vit.create_model, --model, --model.model_name) when vit computes its "
        "network, and is otherwise refused with the reason"
    )
    return 0


def _count_params(cfg: ViTConfig) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init time, even for ViT-H
        return sum(p.numel() for p in VisionTransformer(cfg).parameters())
