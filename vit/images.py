"""Finding and reading image files, as `vit predict` and the data modules both do: the extensions, the recursive
search, and a reader that opens any image as 8-bit RGB or L, upright, alpha composited on white, large JPEGs
decoded at reduced scale, and an unreadable one described in one line."""

from __future__ import annotations

import math
import os
import re
import stat
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data.constants import DEFAULT_CROP_PCT

IMAGE_EXTENSIONS = frozenset(
    {".bmp", ".gif", ".jfif", ".jpe", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".pnm", ".ppm", ".tga", ".tif"}
    | {".tiff", ".webp"}
)
BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as a viewer on a white page shows them
EXIF_ORIENTATION = 0x0112
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # one sample wider than 8 bits: see _to_8_bit
SIXTEEN_BIT_FORMATS = ("PNG", "PPM")  # their samples have at most 16 bits, yet Pillow may open them as 32-bit 'I'
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # a scheme and '//': Path() would turn 'https://' into 'https:/'
EMPTY_SOURCE = "an empty string names no file or folder (an unset shell variable?)"
ImageSource = str | Path | Image.Image


# ------------------------------------------------------------------------------------------ finding images
def find_images(sources: Iterable[ImageSource]) -> list[ImageSource]:
    """Folders become their image files (recursively, known extensions, sorted); files, missing paths, URLs and
    PIL images pass through as given, so that an input that cannot be read is reported, not silently dropped."""
    items: list[ImageSource] = []
    for source in sources:
        if isinstance(source, Image.Image) or _is_url(source):
            items.append(source)
            continue
        if source == "":  # Path('') is '.', the whole current folder
            raise ValueError(EMPTY_SOURCE)
        path = Path(source)
        found = images_under(path) if path.is_dir() else []
        items.extend(found or [source])  # an empty folder stays, to be reported as one
    return items


def images_under(folder: Path) -> list[Path]:
    """The files named like images under `folder`, sorted. Symbolic links to folders are followed, as torchvision's
    ImageFolder (so `vit test`) follows them, except one back to a folder above it (a loop): skipped, with a warning."""
    root = str(folder)
    above = {root: frozenset([os.path.realpath(root)])}  # each folder's real path and those of the folders above it
    found = []
    for top, folders, files in os.walk(root, followlinks=True):
        chain = above.pop(top)
        kept = []
        for name in folders:
            path = os.path.join(top, name)
            real = os.path.realpath(path)
            if real in chain:
                warnings.warn(
                    f"{path}: skipped: a symbolic link back to {real}, a folder above it (a loop)", stacklevel=3
                )
            else:
                above[path] = chain | {real}
                kept.append(name)
        folders[:] = kept  # os.walk descends into these only
        # files: whatever is not a folder, so a broken symbolic link named like an image is reported, not dropped
        found += [Path(top, name) for name in files if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


# ------------------------------------------------------------------------------------------ reading images
def read_image(source: ImageSource, mode: str = "RGB", min_size: int | None = None) -> Image.Image:
    """Open an image as 8-bit 'RGB' or 'L', upright (EXIF orientation applied), alpha composited on white,
    16-bit, 32-bit integer and float samples scaled (not clipped) to 8 bits by `_to_8_bit`'s rule.

    A JPEG at least twice `min_size` on both sides is decoded at 1/2, 1/4 or 1/8 scale by libjpeg (PIL's
    `draft`), never below `min_size`: the resize that follows gives nearly the same pixels, many times faster.
    """
    if isinstance(source, Image.Image):
        return _convert(ImageOps.exif_transpose(source), mode, source.format)
    if _is_url(source):
        raise ValueError("URLs are not read as images: download the file first")
    path = Path(source)
    try:
        info = path.stat()  # one call for both checks: training reads every image of a data set through here
    except FileNotFoundError:
        if path.is_symlink():
            raise ValueError(f"broken symbolic link (to {os.readlink(path)}, which does not exist)") from None
        raise
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError("folder holds no image files")
    if info.st_size == 0:
        raise ValueError("empty file")
    with Image.open(path) as img:
        if min_size and img.format == "JPEG":
            img.draft(None, (min_size, min_size))  # keeps both sides >= min_size
        img.load()  # decodes; a truncated file fails here
        file_format = img.format  # the transposed copy below has none
        if img.getexif().get(EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even an upright image
            img = ImageOps.exif_transpose(img)
        return _convert(img, mode, file_format)


def _is_url(source: ImageSource) -> bool:
    return isinstance(source, str) and URL.match(source) is not None


def _convert(img: Image.Image, mode: str, file_format: str | None = None) -> Image.Image:
    if img.mode in WIDE_MODES:  # PIL's own conversion to 'L' clips above 255 and truncates floats ([0, 1] -> black)
        img = _to_8_bit(img, sixteen_bit=img.mode.startswith("I;16") or file_format in SIXTEEN_BIT_FORMATS)
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        img = Image.alpha_composite(Image.new("RGBA", img.size, (*BACKGROUND, 255)), img)
    return img if img.mode == mode else img.convert(mode)


def _to_8_bit(img: Image.Image, sixteen_bit: bool) -> Image.Image:
    """A single-channel image of wide samples as 8-bit 'L', rounded. The scale: 1/257 (65535 -> 255) for samples
    stored in 16 bits; otherwise (32-bit integers, floats) by the image's range: floats all within [0, 1] times
    255, samples all within [0, 255] as they are, all within [0, 65535] times 1/257. NaN, infinity, negative
    samples or samples above 65535 are a ValueError naming the range: no fixed scale would show them faithfully."""
    samples = np.asarray(img, dtype=np.float64)
    if not np.isfinite(samples).all():
        raise ValueError(f"{img.mode!r} image with NaN or infinite sample values: cannot scale it to 8 bits")
    low, high = (samples.min(), samples.max()) if samples.size else (0.0, 0.0)
    if sixteen_bit and low >= 0 and high <= 65535:
        scale = 1 / 257
    elif img.mode == "F" and low >= 0 and high <= 1:
        scale = 255.0
    elif low >= 0 and high <= 255:
        scale = 1.0
    elif low >= 0 and high <= 65535:
        scale = 1 / 257
    else:
        raise ValueError(
            f"sample values from {low:g} to {high:g} ({img.mode!r} image) fit none of the ranges read: "
            "[0, 1] (floats), [0, 255], [0, 65535]"
        )
    return Image.fromarray(np.rint(samples * scale).astype(np.uint8), "L")


def decode_size(data_config: dict[str, Any], crop_scale: float | None = None) -> int | None:
    """The least side a JPEG may be decoded at (`read_image`'s `min_size`) so that the transform still has the
    pixels it needs: the evaluation resize (input size / crop_pct), or, for a random resized crop that may keep
    `crop_scale` of the area at aspect 3:4, the image side whose smallest crop still covers the input size (None,
    full size, for crops that may be arbitrarily small)."""
    side = max(data_config["input_size"][-2:])
    if crop_scale is not None:
        return math.ceil(side / math.sqrt(crop_scale * 3 / 4)) if crop_scale > 0 else None
    return math.ceil(side / (data_config.get("crop_pct") or DEFAULT_CROP_PCT))


def describe_error(error: BaseException) -> str:
    """One line naming what is wrong with an input, without the traceback."""
    if isinstance(error, FileNotFoundError):
        return "no such file or folder"
    if isinstance(error, UnidentifiedImageError):
        return "not an image (PIL cannot identify the format)"
    if isinstance(error, Image.DecompressionBombError):
        return f"image too large ({error}); raise PIL.Image.MAX_IMAGE_PIXELS if you trust it"
    if isinstance(error, OSError) and "truncated" in str(error).lower():  # PIL's words vary; say it once
        detail = re.search(r"\(([^()]*)\)\s*$", str(error))  # '(46 bytes not processed)'
        return "truncated image file" + (f" ({detail.group(1)})" if detail else "")
    text = str(error) or type(error).__name__
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror.lower()
    return text if isinstance(error, (ValueError, IsADirectoryError)) else f"unreadable image ({text})"
