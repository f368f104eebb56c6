"""Classify images with a trained ViT: images read by `vit.images`, preprocessing from the checkpoint, decoding in
DataLoader workers, batched top-k predictions, and the table / JSON / CSV output of `vit predict`.

A result is a plain dict, the JSON schema of `vit predict --format json`:
`{"path": str | None, "predictions": [{"label": str, "index": int, "prob": float}, ...], "error": str | None}`.
An input that cannot be read gets an `error` and no predictions; the others are still classified.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset

from vit.images import ImageSource, decode_size, describe_error, find_images, read_image
from vit.model import VisionTransformer
from vit.precision import slow_on_this_cpu

TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
FEW_IMAGES = 8  # a progress bar only above this many inputs

Result = dict[str, Any]


# ------------------------------------------------------------------------------------------- predicting
class _Images(Dataset):
    """Decodes and preprocesses one input; a failure becomes an error message, never an exception."""

    def __init__(self, items: Sequence[ImageSource], preprocess: Any):
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.preprocess(self.items[i]), None
        except Exception as e:  # any failure on one user file must not stop the others
            return i, None, describe_error(e)


def _worker_stops_quietly(worker_id: int) -> None:
    """A DataLoader worker's SIGTERM from anyone (a scheduler or `kill` signalling the whole process group) ends it
    quietly, as Ctrl-C does: torch's own handler would die of the signal, and the main process, which has its own
    SIGTERM to handle, would then raise 'DataLoader worker ... is killed by signal' wherever it happened to be.
    A main process that stops while taking a batch leaves the worker's descriptor-sharing thread (multiprocessing's
    resource_sharer) with a broken connection, whose traceback that thread prints through `sys.excepthook`: the
    worker drops those, and reports anything else as before."""
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
    report = sys.excepthook

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not issubclass(kind, (ConnectionError, EOFError)):  # the main process went away mid-transfer
            report(kind, value, tb)

    sys.excepthook = excepthook


def _collate(samples: list[tuple[int, torch.Tensor | None, str | None]]) -> tuple[list, torch.Tensor | None, list]:
    good = [(i, x) for i, x, _ in samples if x is not None]
    errors = [(i, e) for i, x, e in samples if x is None]
    batch = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], batch, errors


class Predictor:
    """Top-k classification of image files, folders and PIL images with a ViT, in batches."""

    def __init__(
        self,
        model: VisionTransformer | torch.nn.Module,
        *,
        class_names: Sequence[str] | None = None,
        data_config: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        num_workers: int | None = None,
        amp: bool = False,
        amp_dtype: torch.dtype = torch.bfloat16,
    ):
        """`amp`: run the model under `torch.autocast(amp_dtype)` (timm's `--amp`): several times faster on GPUs and
        on CPUs with AMX, probabilities within about 0.01; on a CPU where `amp_dtype` is slower, it warns.
        `model` may be a `ViTClassifier`: its `inference_model` (EMA weights when on), class names and preprocessing."""
        if not isinstance(model, VisionTransformer):
            inner = getattr(model, "inference_model", None)
            if not isinstance(inner, VisionTransformer):
                raise TypeError(
                    f"Predictor takes a vit.VisionTransformer or a ViTClassifier, not {type(model).__name__}"
                )
            class_names = getattr(model, "class_names", None) if class_names is None else class_names
            data_config = data_config or getattr(model, "data_config", None)
            model = inner
        if model.num_classes < 1:
            raise ValueError("the model has no classification head (num_classes=0)")
        if model.cfg.in_chans not in (1, 3):
            raise ValueError(f"images can be fed to models with 1 or 3 input channels, not {model.cfg.in_chans}")
        if class_names is not None and len(class_names) != model.num_classes:
            raise ValueError(f"{len(class_names)} class names for a model with {model.num_classes} classes")
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.device = _device(device)
        self.model = model.eval().to(self.device)
        self.class_names = list(class_names) if class_names is not None else None
        config = {**model.pretrained_cfg, **(data_config or {})}
        self.data_config = {k: config[k] for k in TRANSFORM_KEYS if k in config}
        self.transform = create_transform(**self.data_config, is_training=False)
        self.mode = "L" if model.cfg.in_chans == 1 else "RGB"
        height, width = self.data_config["input_size"][-2:]
        if (height, width) != model.cfg.img_hw and not model.cfg.dynamic_img_size:
            raise ValueError(
                f"the preprocessing's input size {height}x{width} does not match the model's "
                f"{'x'.join(map(str, model.cfg.img_hw))}"
            )
        self.min_size = decode_size(self.data_config)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.amp, self.amp_dtype = amp, amp_dtype
        if amp:
            _check_autocast(self.device.type, amp_dtype)
            slow = self.device.type == "cpu" and slow_on_this_cpu(amp_dtype)
            if slow:
                warnings.warn(f"amp makes prediction slower here: {slow}; predict without it", stacklevel=2)

    @classmethod
    def from_checkpoint(
        cls,
        source: str | Path,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        num_workers: int | None = None,
        amp: bool = False,
        amp_dtype: torch.dtype = torch.bfloat16,
        model_name: str | None = None,
    ) -> Predictor:
        """A predictor from anything `vit.load_model` reads: a `vit fit` .ckpt, our .safetensors, a Hugging
        Face or timm folder, a timm tag (when online), or plain weights of the variant `model_name`; class names and
        preprocessing come from the checkpoint."""
        from vit.weights import load_model

        model, checkpoint = load_model(source, model_name)
        if model.num_classes < 1:  # a backbone (a headless Hugging Face ViTModel, say): name the file
            raise ValueError(f"{source}: the model has no classification head (num_classes=0)")
        return cls(
            model,
            class_names=checkpoint.class_names,
            data_config=checkpoint.data_config,
            device=device,
            batch_size=batch_size,
            num_workers=num_workers,
            amp=amp,
            amp_dtype=amp_dtype,
        )

    def preprocess(self, source: ImageSource) -> torch.Tensor:
        """One input as the model sees it: (C, H, W), resized, centre-cropped and normalised."""
        return self.transform(read_image(source, self.mode, self.min_size))

    def label(self, index: int) -> str:
        """The class name of an output index (the index itself when the checkpoint has no names)."""
        return self.class_names[index] if self.class_names else str(index)

    def predict(
        self, inputs: ImageSource | Iterable[ImageSource], topk: int = 5, *, progress: bool | None = None
    ) -> list[Result]:
        """Classify files, folders (searched recursively) or PIL images: one result per image, in order.

        `progress=None` shows a bar on a terminal when there are more than a few images.
        """
        return list(self.iter_predict(inputs, topk, progress=progress))

    def iter_predict(
        self, inputs: ImageSource | Iterable[ImageSource], topk: int = 5, *, progress: bool | None = None
    ) -> Iterator[Result]:
        """As `predict`, but yields each result, in order, as soon as its batch is classified: for writing output
        as it comes, and for folders too large to hold every result in memory. Folders are searched at the call."""
        if topk < 1:
            raise ValueError(f"topk must be at least 1, got {topk}")
        single = isinstance(inputs, (str, Path, Image.Image))
        items = find_images([inputs] if single else inputs)
        return self._classify(items, min(topk, self.model.num_classes), progress)

    @torch.inference_mode()
    def _classify(self, items: list[ImageSource], k: int, progress: bool | None) -> Iterator[Result]:
        loader = DataLoader(
            _Images(items, self.preprocess),
            batch_size=self.batch_size,
            num_workers=self._workers(len(items)),
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_worker_stops_quietly,
        )
        with warnings.catch_warnings():
            # torch warns of more workers than cores at DataLoader(), then again at iter(): once is enough
            warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)
            batches = iter(loader)
        show = progress if progress is not None else len(items) > FEW_IMAGES and sys.stderr.isatty()
        with _progress_bar(len(items), show) as advance:
            for indices, batch, errors in batches:
                results = {i: _result(items[i], [], message) for i, message in errors}
                if batch is not None:
                    with torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp):
                        logits = self.model(batch.to(self.device, non_blocking=True))
                    probs, classes = logits.float().softmax(-1).topk(k)
                    for i, p, c in zip(indices, probs.tolist(), classes.tolist()):
                        predictions = [{"label": self.label(j), "index": j, "prob": q} for j, q in zip(c, p)]
                        results[i] = _result(items[i], predictions, None)
                advance(len(results))
                yield from (results[i] for i in sorted(results))  # a batch holds consecutive inputs

    def _workers(self, n_items: int) -> int:
        if self.num_workers is not None:
            return self.num_workers
        if n_items <= self.batch_size:  # one batch: nothing to overlap, so starting a worker only costs time
            return 0
        # Decoding overlaps the model; the model itself wants the cores, so a few workers are enough.
        return max(1, min(4, (os.cpu_count() or 2) - 1))


def _result(item: ImageSource, predictions: list[dict[str, Any]], error: str | None) -> Result:
    return {"path": None if isinstance(item, Image.Image) else str(item), "predictions": predictions, "error": error}


def _check_autocast(device_type: str, dtype: torch.dtype) -> None:
    """ValueError, before any image is read, where torch's autocast refuses `dtype` (bfloat16 on a T4 or V100)."""
    try:
        torch.autocast(device_type, dtype)
    except RuntimeError as e:
        raise ValueError(f"amp in {str(dtype).removeprefix('torch.')} on {device_type}: {e}") from None


def _device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
        torch.empty(0, device=device)  # fails early and clearly when the device is absent
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"device {str(device)!r} is not usable ({str(e).splitlines()[0]})") from None
    return device


@contextmanager
def _progress_bar(total: int, show: bool) -> Iterator[Callable[[int], None]]:
    """A transient rich progress bar on stderr, or nothing; yields `advance(n)`."""
    if not show:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("classifying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("classifying", total=total)
        yield lambda n: bar.advance(task, n)


# -------------------------------------------------------------------------------------------- output
def write_results(results: Iterable[Result], fmt: str, stream: IO[str] | None = None) -> None:
    """Write results as 'json' (DESIGN's schema), 'csv' (one row per input and rank) or a rich 'table'. JSON and
    CSV are written as the results come (from `Predictor.iter_predict`, say); a table needs them all first."""
    stream = stream or sys.stdout
    if fmt == "json":
        # json.dump(list(results), indent=2), item by item: a list cut short by Ctrl-C stays unterminated, not valid
        stream.write("[")
        n = 0
        for n, r in enumerate(results, 1):
            stream.write(("," if n > 1 else "") + "\n  " + json.dumps(r, indent=2).replace("\n", "\n  "))
        stream.write("\n]\n" if n else "]\n")
    elif fmt == "csv":
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(["path", "rank", "label", "index", "prob", "error"])
        for r in results:
            rows = [
                [r["path"], rank, p["label"], p["index"], f"{p['prob']:.6f}", ""]
                for rank, p in enumerate(r["predictions"], 1)
            ]
            if r["error"] is not None:
                rows.append([r["path"], "", "", "", "", r["error"]])
            writer.writerows(rows)  # one call: Python handles Ctrl-C between calls, so an input keeps all its ranks
    elif fmt == "table":
        _write_table(list(results), stream)
    else:
        raise ValueError(f"unknown format {fmt!r}: use table, json or csv")


def _write_table(results: Sequence[Result], stream: IO[str]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text  # Text, not markup: file names and labels may hold '[...]'

    table = Table("path", "rank", "label", "prob", box=None)
    failures = []  # listed under the table: an error in the label column would widen it for every row
    for n, r in enumerate(results):
        path = Text(r["path"] if r["path"] is not None else f"<image {n}>")
        if r["error"] is not None:
            failures.append(Text.assemble(path, ": ", (f"error: {r['error']}", "red")))
        for rank, p in enumerate(r["predictions"], 1):
            table.add_row(path if rank == 1 else "", str(rank), Text(p["label"]), f"{p['prob']:.3f}")
    console = Console(file=stream, width=None if stream.isatty() else 160, highlight=False)
    with console.capture() as captured:
        if table.row_count:
            console.print(table)
        for failure in failures:
            console.print(failure)
    # Line by line: Python drops the rest of one large write into a pipe closed early and raises nothing
    stream.writelines(captured.get().splitlines(keepends=True))
