"""Named ViT variants (timm's names and configs, plus small-image variants of our own), `create_model` and
`list_models`."""

from __future__ import annotations

import difflib
import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vit.model import VisionTransformer, ViTConfig, default_data_config

if TYPE_CHECKING:  # vit.weights imports this module
    from vit.weights import Checkpoint

# (embed_dim, depth, num_heads) as in the ViT, DeiT and AugReg papers; 'nano' is ours, for 32 px inputs.
SIZES: dict[str, dict[str, Any]] = {
    "nano": dict(embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0),
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "medium": dict(embed_dim=512, depth=12, num_heads=8),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}
REGISTER_GAP = dict(class_token=False, reg_tokens=4, no_embed_class=True, global_pool="avg")
# timm's default tag for these is a headless backbone (in21k or DINO), so `timm.create_model(name)` has no head.
HEADLESS = ("vit_small_patch8_224", "vit_large_patch32_224", "vit_huge_patch14_224")


def _build_variants() -> dict[str, dict[str, Any]]:
    variants: dict[str, dict[str, Any]] = {}
    for size in ("tiny", "small", "base", "large"):
        for patch in (8, 14, 16, 32):
            for img in (224, 384):
                if img % patch == 0:
                    variants[f"vit_{size}_patch{patch}_{img}"] = dict(SIZES[size], patch_size=patch, img_size=img)
    variants["vit_huge_patch14_224"] = dict(SIZES["huge"], patch_size=14, img_size=224)
    for size in ("medium", "base"):
        variants[f"vit_{size}_patch16_reg4_gap_256"] = dict(SIZES[size], patch_size=16, img_size=256, **REGISTER_GAP)
    variants["vit_medium_patch16_reg4_gap_256"]["init_values"] = 1e-5
    for name in HEADLESS:
        variants[name]["num_classes"] = 0
    for size in ("nano", "tiny", "small"):  # 32x32 inputs (CIFAR): patch 4 gives an 8x8 grid
        variants[f"vit_{size}_patch4_32"] = dict(SIZES[size], patch_size=4, img_size=32)
    return variants


VARIANTS = _build_variants()


def list_models(pattern: str = "*") -> list[str]:
    """Variant names matching a shell-style pattern, sorted."""
    return sorted(name for name in VARIANTS if fnmatch.fnmatch(name, pattern))


def timm_tags(name: str) -> list[str]:
    """The timm tags with pretrained weights for a variant, timm's default tag first (`create_model(name,
    pretrained=True)` loads it); [] for names of our own and for timm architectures that timm has no weights for."""
    import timm
    from timm.models import get_pretrained_cfg

    tags = timm.list_pretrained(f"{name}.*")  # only tags with weights: timm's 'untrained' placeholder is left out
    default = f"{name}.{get_pretrained_cfg(name).tag}" if tags else None
    return sorted(tags, key=lambda tag: tag != default)  # stable: the default first, then timm's order


def unknown_tag(name: str) -> str | None:
    """Why `name`'s tag (`vit_small_patch16_224.augreg_in1k`) names nothing, in one line; None for a tag timm knows
    for the architecture, or no tag. timm refuses an unknown tag even with pretrained=False, and so do we."""
    import timm
    from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg

    arch, _, tag = name.partition(".")
    # no tag, a bare 'name.' (timm.create_model's default tag), or an unknown model, which model_config names
    if not tag or not (arch in VARIANTS or timm.is_model(arch)):
        return None
    if not timm.is_model(arch):
        return f"{name}: no pretrained tag {tag!r} for {arch}, a variant of vit's own, which has none"
    try:
        get_pretrained_cfg(name)
        return None
    except RuntimeError:  # timm's "Invalid pretrained tag (...) for ..."
        from vit.checkpoint_files import short_list

        tags = [t.partition(".")[2] for t in get_arch_pretrained_cfgs(arch)]
        return f"{name}: timm has no pretrained tag {tag!r} for {arch} (its tags: {short_list(tags, 4)})"


def model_config(name: str, **overrides: Any) -> ViTConfig:
    """The `ViTConfig` of a named variant, or of any timm ViT architecture whose network ours computes; a timm tag
    suffix such as `.augreg_in21k` must be one timm knows for the architecture."""
    import timm

    from vit.timm_config import timm_model_config

    if problem := unknown_tag(name):
        raise ValueError(problem)
    arch = name.split(".", 1)[0]
    if arch not in VARIANTS and timm.is_model(arch) and (config := timm_model_config(arch, **overrides)):
        return config
    if arch not in VARIANTS:
        close = difflib.get_close_matches(arch, VARIANTS, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (`vit models` lists them all)")
    return ViTConfig.from_dict({**VARIANTS[arch], **overrides})


def named_data_config(name: str, cfg: ViTConfig) -> dict[str, Any]:
    """The preprocessing of a model built by name, at `cfg`'s input size: timm's for a name timm knows (mean, std,
    crop and resampling of the tag's pretrained config, else of timm's default tag), ours for variants of our own."""
    from vit.timm_config import timm_data_config

    return timm_data_config(name, cfg) or default_data_config(cfg)


def create_model(
    name: str,
    *,
    pretrained: bool | str | Path | Checkpoint = False,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    **overrides: Any,
) -> VisionTransformer:
    """Build a named variant, optionally with weights; its preprocessing (`pretrained_cfg`) is the checkpoint's,
    else `named_data_config(name)`.

    `pretrained` is True (the timm tag in `name`, or timm's default tag), a timm tag, a local checkpoint
    path in any format `vit.load_pretrained` reads, or a `Checkpoint` already read. With `num_classes=None` a
    pretrained model keeps the checkpoint's head; otherwise a differing head is reset.
    """
    from vit.weights import read_checkpoint, transfer_weights

    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if img_size is not None:
        overrides["img_size"] = img_size
    checkpoint = read_checkpoint(name if pretrained is True else pretrained) if pretrained else None
    if checkpoint is not None and num_classes is None:
        overrides["num_classes"] = checkpoint.num_classes
    model = VisionTransformer(model_config(name, **overrides))
    model.pretrained_cfg = named_data_config(name, model.cfg)
    if checkpoint is not None:
        transfer_weights(model, checkpoint)  # a checkpoint's own preprocessing wins
    return model
