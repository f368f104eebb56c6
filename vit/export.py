"""`vit export`: a checkpoint as ONNX (dynamic batch axis) or as safetensors, each carrying the model config,
class names and preprocessing in its metadata, so the file alone is enough to classify images."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vit.checkpoint_files import atomic_write_beside
from vit.model import VisionTransformer
from vit.predict import TRANSFORM_KEYS
from vit.weights import load_model, save_safetensors

FORMATS = ("onnx", "safetensors")
ONNX_INPUT, ONNX_OUTPUT = "image", "logits"
LEGACY_OPSET = 17


def export_onnx(
    model: VisionTransformer,
    path: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    data_config: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as ONNX: 'image' (batch, C, H, W) -> 'logits' (batch, classes), the batch axis dynamic, and
    H and W too (multiples of the patch size) for a `dynamic_img_size` model.

    The dynamo exporter is tried first; should it refuse the graph, the TorchScript exporter is used.
    """
    path = Path(path)
    with atomic_write_beside(path) as temp:  # a failed or interrupted export leaves the file that was there
        _write_onnx(model.eval(), temp)
        _add_onnx_metadata(temp, _metadata(model, class_names, data_config))
    return path


def _write_onnx(model: VisionTransformer, path: Path) -> None:
    c, (h, w), p = model.cfg.in_chans, model.cfg.img_hw, model.cfg.patch_size
    names = dict(input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT])
    shapes, traced_hw = {0: torch.export.Dim("batch")}, (h, w)
    if model.cfg.dynamic_img_size:
        # traced one patch larger each way, so that the graph holds the branch that resamples the position
        # embeddings (at the native size the model skips it, and the graph would add the native table at any size)
        shapes |= {2: p * torch.export.Dim("grid_height"), 3: p * torch.export.Dim("grid_width")}
        traced_hw = (h + p, w + p)
    example = (torch.randn(2, c, *traced_hw),)  # batch 2: torch.export would specialise a size-1 axis
    try:
        program = torch.onnx.export(model, example, dynamo=True, dynamic_shapes={"x": shapes}, verbose=False, **names)
    except ImportError as e:
        raise ValueError(
            f"ONNX export needs the onnx and onnxscript packages ({e}): pip install onnx onnxscript"
        ) from e
    except Exception as e:
        # the TorchScript exporter has no antialiased bicubic resize: its graph keeps the model's own input size
        fixed = f", whose input size is fixed at {h}x{w}" if model.cfg.dynamic_img_size else ""
        warnings.warn(
            f"the dynamo ONNX exporter failed ({type(e).__name__}: {e}); using the TorchScript one{fixed}",
            stacklevel=3,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants: expected
            torch.onnx.export(
                model,
                (torch.randn(2, c, h, w),),
                str(path),
                dynamo=False,
                opset_version=LEGACY_OPSET,
                dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
                **names,
            )
    else:  # outside the try: failing to write the file is no reason to try the other exporter
        program.save(str(path))


def _metadata(model: VisionTransformer, class_names: Sequence[str] | None, data_config: dict | None) -> dict:
    config = {**model.pretrained_cfg, **(data_config or {})}
    meta = {"model_config": model.cfg.to_dict(), "data_config": {k: config[k] for k in TRANSFORM_KEYS if k in config}}
    if class_names is not None:
        meta["class_names"] = list(class_names)
    return meta


def _add_onnx_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """JSON values under the same keys as in our safetensors files, as ONNX metadata_props."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)  # a > 2 GB model keeps its external data file as is
    onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in metadata.items()})
    onnx.save(proto, str(path))


def onnx_logit_difference(model: VisionTransformer, path: str | Path, batch_sizes: Sequence[int] = (1, 3)) -> float:
    """Largest |logit difference| between onnxruntime running `path` and torch running `model`, on random
    inputs at each batch size (and at a second input size where the file's input size is dynamic)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (h, w), p = model.cfg.img_hw, model.cfg.patch_size
    sizes = [(h, w)]
    if isinstance(session.get_inputs()[0].shape[2], str):  # a dynamic height: also another size, a non-square grid
        sizes.append((h + 2 * p, w + p))
    worst = 0.0
    generator = torch.Generator().manual_seed(0)
    for batch, hw in ((b, hw) for b in batch_sizes for hw in sizes):
        x = torch.randn(batch, model.cfg.in_chans, *hw, generator=generator)
        with torch.inference_mode():
            expected = model.eval()(x).float()
        (got,) = session.run([ONNX_OUTPUT], {ONNX_INPUT: x.numpy()})
        worst = max(worst, (torch.from_numpy(got) - expected).abs().max().item())
    return worst


def export_checkpoint(
    source: str | Path, fmt: str, out: str | Path, model_name: str | None = None
) -> tuple[VisionTransformer, Path]:
    """Load any checkpoint `vit.load_model` reads (`model_name` for plain weights) and write it as 'onnx' or
    'safetensors' to `out`."""
    from safetensors import SafetensorError

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out} is a folder: give the file to write, e.g. {out / f'model.{fmt}'}")
    if out.exists() and Path(source).exists() and out.samefile(source):  # a .ckpt would be lost for good
        raise ValueError(f"{out} is the checkpoint being exported: give --out another file")
    model, checkpoint = load_model(source, model_name)
    meta = _metadata(model, checkpoint.class_names, checkpoint.data_config)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "onnx":
            export_onnx(model, out, class_names=checkpoint.class_names, data_config=meta["data_config"])
        else:
            save_safetensors(model, out, class_names=checkpoint.class_names, data_config=meta["data_config"])
    except (OSError, SafetensorError) as e:  # a full disk, a folder we may not write to, a file where a folder goes
        # strerror: an OSError's own text names the temporary file beside `out`
        raise ValueError(f"{out}: could not write it ({getattr(e, 'strerror', None) or e})") from None
    suffix = out.suffix.lstrip(".").lower()
    if suffix != fmt and (suffix in FORMATS or fmt == "safetensors"):
        # vit and timm pick a weights file's reader by its suffix: under another name it would not load again
        name = f"a .{suffix} name" if suffix else "a name without a suffix"
        reread = "; vit and timm read safetensors only from .safetensors files" if fmt == "safetensors" else ""
        warnings.warn(f"{out}: {fmt} written under {name}{reread}", stacklevel=2)
    return model, out
