"""Every way weights come in or go out: timm, Hugging Face, JAX .npz, Lightning .ckpt and safetensors.

Files are read only through safetensors, numpy without pickle, or `torch.load(weights_only=True)`, so a
checkpoint can never run code. Every format is converted to timm's key names, then adapted to the model
(position and patch embeddings resampled, input channels adapted, a differing head reset) and loaded. The file
access underneath is `vit.checkpoint_files`; Hugging Face and JAX layouts are converted by `vit.conversions`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import adapt_input_conv
from torch import nn

from vit.checkpoint_files import (
    Checkpoint,
    CheckpointError,
    atomic_write,
    download,
    read_json,
    short_list,
    torch_load,
)
from vit.conversions import (
    HF_VIT_TYPES,
    TIMM_ANCHOR,
    config_numbers,
    convert_hf_state_dict,
    convert_jax_npz,
    hf_config_to_vit,
    hf_preprocessing,
    to_timm_keys,
)
from vit.model import VisionTransformer, ViTConfig, fit_channels

__all__ = [  # the public API of weights, wherever each piece lives
    "Checkpoint",
    "CheckpointError",
    "atomic_write",
    "convert_hf_state_dict",
    "convert_jax_npz",
    "hf_config_to_vit",
    "load_model",
    "load_pretrained",
    "read_checkpoint",
    "save_safetensors",
    "transfer_weights",
]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz", ".ckpt", ".onnx")


# ---------------------------------------------------------------------------------------------- reading
def read_checkpoint(source: str | Path | Mapping[str, Any] | Checkpoint) -> Checkpoint:
    """Read weights from a state dict, a local file or folder, a URL, or a timm name/tag (downloaded); a
    `Checkpoint` already read passes through."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, Mapping):
        return Checkpoint(to_timm_keys(dict(source), "<state dict>"), "<state dict>")
    text = str(source)
    if urlparse(text).scheme in ("http", "https", "file"):
        return read_checkpoint(download(text))
    path = Path(text).expanduser()
    if path.is_dir():
        return _read_hf_folder(path)
    if path.is_file():
        if path.suffix.lower() == ".onnx":  # `vit export`'s other format: no weights to read back out of it
            raise CheckpointError(
                f"{text}: an ONNX model, which vit does not read; run it with onnxruntime, or pass the .ckpt it was "
                "exported from or a .safetensors from `vit export`"
            )
        readers = {".safetensors": _read_safetensors, ".npz": _read_npz}
        return readers.get(path.suffix, _read_torch)(path)
    if path.suffix in WEIGHT_SUFFIXES:  # a file name, never a timm tag
        raise CheckpointError(f"{text}: no such file")
    if re.fullmatch(r"(timm/|hf[-_]hub:)?[\w.-]+", text) and "/" not in text.removeprefix("timm/"):
        return _read_timm_hub(text)
    raise CheckpointError(f"{text}: no such file or folder, and not a timm model name")


def _read_safetensors(path: Path) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    info = {k: json.loads(meta[k]) for k in ("model_config", "class_names", "data_config") if k in meta}
    return Checkpoint(to_timm_keys(state, path), str(path), **info)


def _read_torch(path: Path) -> Checkpoint:
    """.pth/.bin/.pt state dicts (timm or HF keys) and Lightning .ckpt files written by `vit fit`."""
    obj = torch_load(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    meta = obj.get("vit") if isinstance(obj.get("vit"), Mapping) else {}
    state: Any = obj
    for key in ("state_dict", "model", "module"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    state = to_timm_keys(dict(state), path, prefer_prefix=meta.get("weights_prefix"))
    return Checkpoint(
        state,
        str(path),
        meta.get("model_config"),
        meta.get("class_names"),
        meta.get("data_config"),
    )


def _read_hf_folder(path: Path) -> Checkpoint:
    """A Hugging Face `save_pretrained` folder, or a timm one (`save_for_hf`, a Hub download): config.json plus
    model.safetensors or pytorch_model.bin."""
    config_file = path / "config.json"
    weight_files = [path / "model.safetensors", path / "pytorch_model.bin"]
    weights = next((f for f in weight_files if f.is_file()), None)
    if not config_file.is_file():
        raise CheckpointError(f"{path}: a model folder needs config.json and model.safetensors or pytorch_model.bin")
    config = read_json(config_file)
    if "architecture" in config and "model_type" not in config:  # timm's config.json; transformers' has model_type
        return _read_timm_folder(path, config, weights)
    if weights is None:
        raise CheckpointError(f"{path}: a model folder needs config.json and model.safetensors or pytorch_model.bin")
    model_type = config.get("model_type", "vit")
    if model_type not in HF_VIT_TYPES:  # DINOv2, DeiT, BEiT...: their keys or config would fail on less clear terms
        raise CheckpointError(
            f"{config_file}: model_type {model_type!r} is not a ViT this reads (Hugging Face model types: "
            f"{', '.join(HF_VIT_TYPES)})"
        )
    checkpoint = _read_safetensors(weights) if weights.suffix == ".safetensors" else _read_torch(weights)
    checkpoint.source = str(path)
    checkpoint.model_config = hf_config_to_vit(config, num_classes=checkpoint.num_classes, source=config_file)
    processor = path / "preprocessor_config.json"
    if processor.is_file():
        cfg = checkpoint.model_config
        checkpoint.data_config = hf_preprocessing(read_json(processor), cfg["img_size"], cfg["in_chans"], processor)
    if isinstance(config.get("id2label"), Mapping) and checkpoint.num_classes:
        labels = {str(k): v for k, v in config["id2label"].items()}
        checkpoint.class_names = [labels.get(str(i), str(i)) for i in range(checkpoint.num_classes)]
    return checkpoint


def _read_timm_folder(path: Path, config: dict[str, Any], weights: Path | None) -> Checkpoint:
    """A timm model folder (`timm.models.push_to_hf_hub` or `save_for_hf`; a Hub download or cache snapshot): the
    architecture, its constructor arguments (`model_args`), labels and preprocessing (`pretrained_cfg`) in
    config.json, the weights in timm's keys."""
    from timm.data import ImageNetInfo, infer_imagenet_subset, resolve_data_config

    from vit.timm_config import timm_arch_config

    config_file = path / "config.json"
    if weights is None:
        raise CheckpointError(f"{path}: a timm model folder needs model.safetensors or pytorch_model.bin")
    # Older timm wrote one flat dict: the pretrained config with the architecture in it.
    pretrained = config.get("pretrained_cfg", {k: v for k, v in config.items() if k != "architecture"})
    model_args = config.get("model_args") or {}
    for key, value in (("pretrained_cfg", pretrained), ("model_args", model_args)):
        if not isinstance(value, dict):
            raise CheckpointError(f"{config_file}: {key} is not a JSON object (found {type(value).__name__})")
    model_config = timm_arch_config(config["architecture"], model_args, config_file)  # before the weights: a
    # ResNet's are 'no ViT weights found', where its architecture says what it is
    checkpoint = _read_safetensors(weights) if weights.suffix == ".safetensors" else _read_torch(weights)
    checkpoint.source = str(path)
    cfg = ViTConfig(**{**model_config, "num_classes": checkpoint.num_classes})  # the head's, as for HF folders
    checkpoint.model_config = cfg.to_dict()
    data = resolve_data_config(pretrained_cfg={k: v for k, v in pretrained.items() if v is not None})
    for key in ("mean", "std"):
        values = list(data[key]) if isinstance(data[key], (list, tuple)) else data[key]
        n = len(values) if isinstance(values, list) and values else cfg.in_chans
        data[key] = tuple(config_numbers(values, n, key, config_file))
    if not cfg.dynamic_img_size:  # timm builds a fixed-size model at model_args' img_size, its input size too
        data["input_size"] = (cfg.in_chans, *cfg.img_hw)
    checkpoint.data_config = {**data, **fit_channels(data, cfg.in_chans)}
    checkpoint.class_names = _timm_labels(config, pretrained, checkpoint.num_classes, config_file)
    if checkpoint.class_names is None and (subset := infer_imagenet_subset({"num_classes": checkpoint.num_classes})):
        checkpoint.class_names = ImageNetInfo(subset).label_descriptions(as_dict=False)  # as timm's inference does
    return checkpoint


def _timm_labels(config: Mapping[str, Any], pretrained: Mapping[str, Any], n: int, source: Any) -> list[str] | None:
    """A timm config's class names: `label_names` (a list, or {index: name}), each replaced by its entry in
    `label_descriptions` when there is one ('tench' for 'n01440764')."""
    names = config.get("label_names", pretrained.get("label_names", pretrained.get("labels")))
    if not names or not n:
        return None
    if isinstance(names, Mapping):
        names = {str(k): v for k, v in names.items()}
        names = [names.get(str(i), str(i)) for i in range(n)]
    if not isinstance(names, list) or len(names) != n or not all(isinstance(v, str) for v in names):
        raise CheckpointError(f"{source}: label_names is not a list of {n} names (one for each class of the head)")
    descriptions = config.get("label_descriptions", pretrained.get("label_descriptions")) or {}
    return [descriptions.get(v, v) if isinstance(descriptions, Mapping) else v for v in names]


def _read_npz(path: Path) -> Checkpoint:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable .npz file ({e})") from None
    return Checkpoint(convert_jax_npz(arrays, path), str(path))


def _read_timm_hub(tag: str) -> Checkpoint:
    """A timm name or tag (`vit_base_patch16_224.augreg2_in21k_ft_in1k`), fetched through timm's hub code."""
    import timm
    from huggingface_hub import constants as hub_constants
    from huggingface_hub.errors import LocalEntryNotFoundError
    from timm.data import ImageNetInfo, infer_imagenet_subset, resolve_data_config

    from vit.factory import VARIANTS, timm_tags, unknown_tag
    from vit.hub import hub_offline, hub_unreachable
    from vit.timm_config import config_from_timm

    tag = tag.removeprefix("timm/")
    arch = tag.split(".", 1)[0]
    tags = timm_tags(arch)
    if not tag.startswith(("hf-hub:", "hf_hub:")) and (tag not in tags if "." in tag else not tags):
        # a name of ours, an architecture timm leaves untrained, a wrong tag or a typo
        if problem := unknown_tag(tag):  # a tag that names nothing: say which ones do
            raise CheckpointError(problem)
        if arch in VARIANTS or timm.is_model(arch):
            raise CheckpointError(
                f"{tag}: timm has no pretrained weights of that name (`vit models` shows the names that have "
                "them): train it from scratch, or pass a local weights file"
            )
        raise CheckpointError(f"{tag}: no such file or folder, and not a timm model name (see `vit models`)")
    offline = "offline mode is on (HF_HUB_OFFLINE=1)" if hub_constants.is_offline_mode() else hub_unreachable()
    try:
        with hub_offline(offline is not None):
            reference = timm.create_model(tag, pretrained=True)
    except Exception as e:
        if offline and isinstance(e, LocalEntryNotFoundError):
            raise CheckpointError(
                f"{tag}: could not fetch timm weights: {offline}, and they are not in the Hugging Face cache; pass a "
                "local weights file or folder in its place (e.g. path/to/model.safetensors), or download them on a "
                "connected machine"
            ) from None
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{tag}: could not fetch timm weights ({type(e).__name__}: {reason})") from None
    state = to_timm_keys(reference.state_dict(), tag)  # refuses a timm model that is not a ViT
    config = config_from_timm(reference, tag)  # refuses one whose network ours does not compute
    subset = infer_imagenet_subset(reference)
    names = ImageNetInfo(subset).label_descriptions(as_dict=False) if subset else None
    return Checkpoint(state, tag, config, names, resolve_data_config(model=reference))


# -------------------------------------------------------------------------------------------- loading
def transfer_weights(model: VisionTransformer, checkpoint: Checkpoint, *, strict: bool = True) -> None:
    """Adapt a checkpoint to `model` (grid, patch size, channels, head, LayerNorm eps) and load it."""
    cfg, state = model.cfg, dict(checkpoint.state_dict)
    source = checkpoint.source
    eps = (checkpoint.model_config or {}).get("norm_eps")
    if eps is not None and eps != cfg.norm_eps:  # e.g. Hugging Face's 1e-12
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = eps
        model.cfg = cfg = type(cfg)(**{**cfg.to_dict(), "norm_eps": eps})

    pos = state.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape and pos.shape[-1] == cfg.embed_dim:
        old_grid = list(_config(checkpoint).grid_size) if checkpoint.model_config else None  # None: square
        prefix = 0 if cfg.no_embed_class else model.num_prefix_tokens
        _check_pos_embed_layout(pos.shape[1], prefix, old_grid, state, cfg, source)
        state["pos_embed"] = resample_abs_pos_embed(pos, list(cfg.grid_size), old_grid, num_prefix_tokens=prefix)

    proj = state.get("patch_embed.proj.weight")
    if proj is not None and proj.ndim == 4 and proj.shape[0] == cfg.embed_dim and not cfg.conv_stem:
        if proj.shape[1] != cfg.in_chans:  # timm's default base of 3 channels would return a grey conv unchanged
            proj = adapt_input_conv(cfg.in_chans, proj, base_chans=proj.shape[1])
        if proj.shape[-1] != cfg.patch_size:
            proj = resample_patch_embed(proj, [cfg.patch_size, cfg.patch_size])
        state["patch_embed.proj.weight"] = proj

    expected = model.state_dict()
    head, model_head = state.get("head.weight"), expected.get("head.weight")
    new_head = (head is None) != (model_head is None) or (head is not None and head.shape[0] != model_head.shape[0])
    if new_head:  # another class count, or a backbone without a head: the body loads, the head does not
        state = {k: v for k, v in state.items() if not k.startswith("head.")}

    missing = [k for k in expected if k not in state and not (new_head and k.startswith("head."))]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if strict and (missing or unexpected or misshaped):
        parts = [
            f"{label}: {short_list(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
            if keys
        ]
        raise CheckpointError(f"{source} does not fit the model{_shape_note(state, cfg)}; " + "; ".join(parts))
    if new_head:  # said once the body is known to fit: a checkpoint that fits nowhere gets its error alone
        n = 0 if head is None else head.shape[0]
        fresh = "; the model's new head needs training" if model_head is not None else ""
        warnings.warn(
            f"{source}: the checkpoint's head ({n} classes) does not fit the model's ({cfg.num_classes} classes) "
            f"and was not loaded{fresh}",
            stacklevel=3,
        )
    state = {k: v for k, v in state.items() if k in expected and v.shape == expected[k].shape}
    model.load_state_dict(state, strict=False)
    if checkpoint.data_config:
        model.pretrained_cfg = {**model.pretrained_cfg, **checkpoint.data_config}


def _check_pos_embed_layout(
    positions: int,
    prefix: int,
    old_grid: list[int] | None,
    state: Mapping[str, torch.Tensor],
    cfg: ViTConfig,
    source: Any,
) -> None:
    """Before resampling: the checkpoint's position embeddings less the model's `prefix` tokens must be a grid (the
    file's, or a square one), else the two put other tokens in them (class token, registers, no_embed_class), and
    timm's resampler would fail on a reshape or, by chance, mix a token into the grid."""
    patches = positions - prefix
    grid = old_grid[0] * old_grid[1] if old_grid else round(max(patches, 0) ** 0.5) ** 2
    if patches > 0 and patches == grid:
        return
    reg = state.get("reg_token")
    theirs = f"cls_token: {'yes' if 'cls_token' in state else 'no'}, reg_token: {0 if reg is None else reg.shape[1]}"
    ours = f"class_token={cfg.class_token}, reg_tokens={cfg.reg_tokens}, no_embed_class={cfg.no_embed_class}"
    raise CheckpointError(
        f"{source}: its pos_embed has {positions} positions, which are not {prefix} prefix token(s) plus a grid of "
        f"patches: the checkpoint ({theirs}) and the model ({ours}) place the class and register tokens differently; "
        "build the model with the checkpoint's class_token, reg_tokens and no_embed_class"
    )


def _shape_note(state: Mapping[str, torch.Tensor], cfg: ViTConfig) -> str:
    """' (the checkpoint: width 384, depth 12; the model: width 192, depth 12)' when those differ, else '': the
    gist of what may be a hundred mis-shaped keys (a ViT-S file given for a ViT-Ti, say)."""
    proj = state.get(TIMM_ANCHOR)
    width = proj.shape[0] if proj is not None else None
    depth = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    if (width in (None, cfg.embed_dim)) and depth == cfg.depth:
        return ""
    return (
        f" (the checkpoint: width {width or '?'}, depth {depth}; the model: width {cfg.embed_dim}, depth {cfg.depth})"
    )


def load_pretrained(
    model: VisionTransformer, source: str | Path | Mapping[str, Any], *, strict: bool = True
) -> Checkpoint:
    """Load a checkpoint of any supported format into `model`; returns what the file said about itself."""
    checkpoint = read_checkpoint(source)
    transfer_weights(model, checkpoint, strict=strict)
    return checkpoint


def load_model(source: str | Path, model_name: str | None = None) -> tuple[VisionTransformer, Checkpoint]:
    """Build the model a checkpoint describes and load it: its own config (.ckpt, our .safetensors, HF and timm
    folders, timm tags), else the variant `model_name` (a plain state dict, e.g. timm's)."""
    checkpoint = read_checkpoint(source)
    model = VisionTransformer(_config(checkpoint, model_name))
    if checkpoint.model_config is None:  # plain weights: the name's preprocessing (timm's for a timm name)
        from vit.factory import named_data_config

        model.pretrained_cfg = named_data_config(model_name, model.cfg)
    transfer_weights(model, checkpoint)
    return model, checkpoint


def _config(checkpoint: Checkpoint, model_name: str | None = None) -> ViTConfig:
    if checkpoint.model_config is None:
        if model_name is None:
            raise CheckpointError(
                f"{checkpoint.source}: the file carries no model config; name its variant with --model NAME "
                "(`vit models` lists them), or in Python load_model(path, model_name=NAME)"
            )
        from vit.factory import model_config

        return model_config(model_name, num_classes=checkpoint.num_classes)
    if model_name is not None:  # the config the weights were saved with fits them; a name can only be wrong
        warnings.warn(f"{checkpoint.source}: the file's own model config is used, not {model_name!r}", stacklevel=3)
    try:
        return ViTConfig(**checkpoint.model_config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{checkpoint.source}: its model config is not valid ({e})") from None


# -------------------------------------------------------------------------------------------- writing
def save_safetensors(
    model: VisionTransformer,
    path: str | Path,
    *,
    class_names: list[str] | None = None,
    data_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write the weights as safetensors, with the model config, class names and preprocessing as metadata."""
    from safetensors.torch import save_file

    meta = {"model_config": model.cfg.to_dict(), "data_config": dict(data_config or model.pretrained_cfg)}
    if class_names is not None:
        meta["class_names"] = list(class_names)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    with atomic_write(path) as temp:  # a failed write (a full disk, Ctrl-C) leaves the file that was there
        save_file(state, str(temp), metadata={k: json.dumps(v) for k, v in meta.items()})
        umask = os.umask(0)  # safetensors creates the file 0600; give it the mode open() would, as torch.save does
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)
    return path
