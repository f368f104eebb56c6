"""A `ViTConfig` read off a timm `VisionTransformer`, so that any timm ViT name or tag whose network ours computes
builds and loads without a variant of our own (`deit3_*`, `*_dinov2`, `*_clip_*`, `*_siglip_gap_*`, ...), and
timm's preprocessing for such a name.

What ours would compute differently (attention pooling, RMSNorm, SwiGLU, parallel blocks, hybrid stems...) is
refused in one line that names it: those keys may even load, but the logits would not be timm's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vit.model import ACTIVATIONS, POOLS, ViTConfig, fit_channels
from vit.weights import CheckpointError


def _activation(act: nn.Module) -> str | None:
    """Our `act_layer` name for a timm activation module, None if ours has none like it."""
    kind = type(act).__name__
    if kind == "GELU":  # torch's or timm's
        return "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
    names = {"GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu", "SiLU": "silu", "ReLU": "relu"}
    return names.get(kind) if names.get(kind) in ACTIVATIONS else None


def config_from_timm(model: nn.Module, source: Any) -> dict[str, Any]:
    """The `ViTConfig` (as plain values) that builds the network of a timm `VisionTransformer` instance, or a
    `CheckpointError` naming the first feature ours does not compute."""
    from timm.layers import Attention, LayerScale, Mlp, PatchEmbed
    from timm.models.vision_transformer import Block, VisionTransformer

    def refuse(feature: str) -> CheckpointError:
        return CheckpointError(f"{source}: timm's model uses {feature}, which vit's VisionTransformer does not compute")

    if type(model) is not VisionTransformer:
        raise refuse(f"the {type(model).__name__} class (vit builds timm's plain VisionTransformer only)")
    embed, blocks = model.patch_embed, list(model.blocks)
    if type(embed) is not PatchEmbed:
        raise refuse(f"a {type(embed).__name__} patch embedding (a CNN stem)")
    block = blocks[0]
    if kind := next((type(b).__name__ for b in blocks if type(b) is not Block), None):
        raise refuse(f"{kind} blocks")
    if kind := next(
        (type(m).__name__ for b in blocks for m, want in ((b.attn, Attention), (b.mlp, Mlp)) if type(m) is not want),
        None,
    ):
        raise refuse(f"a {kind} layer in its blocks")
    features = {  # each a flag of timm's constructor that no key of the state dict reveals, or one ours lacks
        "a norm after the patch embedding (embed_norm_layer)": not isinstance(embed.norm, nn.Identity),
        "dynamic_img_pad": embed.dynamic_img_pad,
        f"non-square patches {tuple(embed.patch_size)}": embed.patch_size[0] != embed.patch_size[1],
        "no position embedding (pos_embed='none')": model.pos_embed is None,
        "attention pooling (global_pool='map')": getattr(model, "attn_pool", None) is not None,
        f"global_pool={model.global_pool!r}": model.global_pool not in POOLS,
        "pool_include_prefix=True": getattr(model, "pool_include_prefix", False),
        "no final norm (final_norm=False)": isinstance(model.norm, nn.Identity)
        and isinstance(model.fc_norm, nn.Identity),
        "a patch projection with a bias under pre_norm, or without one otherwise": (embed.proj.bias is None)
        != (not isinstance(model.norm_pre, nn.Identity)),
        "a norm inside attention (scale_attn_norm)": not isinstance(block.attn.norm, nn.Identity),
        "a norm inside the MLP (scale_mlp_norm)": not isinstance(block.mlp.norm, nn.Identity),
        "attention output projections without bias (proj_bias=False)": block.attn.proj.bias is None,
        "MLP layers without bias": block.mlp.fc1.bias is None or block.mlp.fc2.bias is None,
        f"{type(block.ls1).__name__} layer scale": not isinstance(block.ls1, (LayerScale, nn.Identity)),
    }
    if feature := next((f for f, used in features.items() if used), None):
        raise refuse(feature)
    norms = [model.norm_pre, model.norm, model.fc_norm]
    norms += [m for b in blocks for m in (b.norm1, b.norm2, b.attn.q_norm, b.attn.k_norm)]
    norms = [m for m in norms if not isinstance(m, nn.Identity)]
    if odd := next((m for m in norms if not isinstance(m, nn.LayerNorm)), None):
        raise refuse(f"{type(odd).__name__} (vit's norms are LayerNorm)")
    if len(eps := {m.eps for m in norms}) != 1:
        raise refuse(f"LayerNorms of differing eps {sorted(eps)}")
    act = _activation(block.mlp.act)
    if act is None:
        raise refuse(f"the {type(block.mlp.act).__name__} activation")
    dim = model.embed_dim
    return ViTConfig(
        img_size=tuple(embed.img_size),
        patch_size=embed.patch_size[0],
        in_chans=embed.proj.in_channels,
        num_classes=model.num_classes,
        global_pool=model.global_pool,
        embed_dim=dim,
        depth=len(blocks),
        num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / dim,
        qkv_bias=block.attn.qkv.bias is not None,
        qk_norm=not isinstance(block.attn.q_norm, nn.Identity),
        init_values=1e-5 if isinstance(block.ls1, LayerScale) else None,  # any value: the checkpoint sets gamma
        class_token=model.cls_token is not None,
        reg_tokens=model.num_reg_tokens,
        no_embed_class=model.no_embed_class,
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        dynamic_img_size=model.dynamic_img_size,
        norm_eps=eps.pop(),
        act_layer=act,
    ).to_dict()


def timm_model_config(name: str, **overrides: Any) -> ViTConfig | None:
    """The `ViTConfig` of timm's architecture `name` (built on the meta device: no weights, no memory); None when
    it is no transformer over patches at all (a ResNet, say)."""
    reference = _on_meta(name)
    if not hasattr(reference, "patch_embed"):
        return None
    return ViTConfig.from_dict({**config_from_timm(reference, name), **overrides})


def timm_arch_config(architecture: Any, model_args: dict[str, Any], source: Any) -> dict[str, Any]:
    """The `ViTConfig` (as plain values) of timm's `architecture` built with timm's constructor arguments
    `model_args` (as a timm folder's config.json holds them), or a one-line `CheckpointError` naming `source`."""
    import timm

    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise CheckpointError(f"{source}: architecture {architecture!r} is not a model timm {timm.__version__} knows")
    try:
        reference = _on_meta(architecture, **model_args)
    except Exception as e:  # an argument this timm does not take, or a value it refuses
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{source}: timm cannot build {architecture} with its model_args ({type(e).__name__}: {reason})"
        ) from None
    return config_from_timm(reference, f"{source} ({architecture})")  # refuses a ResNet as well as a SigLIP


def _on_meta(architecture: str, **model_args: Any) -> nn.Module:
    """timm's model on the meta device: its modules and shapes to read a config off, without weights or memory."""
    import timm

    with torch.device("meta"):
        return timm.create_model(architecture, pretrained=False, **model_args)


def timm_data_config(name: str, cfg: ViTConfig) -> dict[str, Any] | None:
    """timm's preprocessing for a timm name (its tag's pretrained config, else timm's default tag's) at `cfg`'s
    input size, as timm's `resolve_data_config` gives it; None for a name timm does not know."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    try:
        pretrained = get_pretrained_cfg(name)
    except RuntimeError:  # a tag timm does not have (which model_config refuses): the default tag's preprocessing
        pretrained = get_pretrained_cfg(name.split(".", 1)[0])
    if pretrained is None:  # not a timm name, or a timm architecture without any pretrained config
        return None
    config = resolve_data_config(pretrained_cfg=pretrained.to_dict())
    return {**config, **fit_channels(config, cfg.in_chans), "input_size": (cfg.in_chans, *cfg.img_hw)}
