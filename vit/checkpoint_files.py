"""What a checkpoint is once read (`Checkpoint`, `CheckpointError`), and the file access under every reader:
`torch.load(weights_only=True)` after the zip's checksums are checked, JSON, downloads into torch's hub cache,
and writes that replace a file whole or not at all. Nothing here runs code from a file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


@dataclass
class Checkpoint:
    """Weights in timm's key names, plus what the file says about the model that made them."""

    state_dict: dict[str, torch.Tensor]
    source: str
    model_config: dict[str, Any] | None = None
    class_names: list[str] | None = None
    data_config: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        """Outputs of the checkpoint's head; 0 for a backbone without one."""
        head = self.state_dict.get("head.weight")
        return 0 if head is None else head.shape[0]

    def __repr__(self) -> str:  # the dataclass's would print every tensor
        names = self.class_names
        classes = None if names is None else f"[{short_list(names)}]"
        return (
            f"Checkpoint(source={self.source!r}, {len(self.state_dict)} tensors, num_classes={self.num_classes}, "
            f"class_names={classes}, model_config={self.model_config}, data_config={self.data_config})"
        )


NOT_A_CHECKPOINT = "not a readable PyTorch checkpoint (nor a .safetensors or .npz file, nor a Hugging Face folder)"


def torch_load(path: Path) -> Any:
    """`torch.load(weights_only=True)` on the CPU, after the zip's checksums: a `CheckpointError` in words for a
    damaged file, one that is no checkpoint, or one that holds pickled objects that could run code."""
    check_zip_checksums(path)
    try:
        with warnings.catch_warnings():  # junk bytes read as "protocol 132": torch's note adds nothing to our error
            warnings.filterwarnings("ignore", "Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please|\n\n|$)", str(e), re.S)
        reason = " ".join((found.group(1) if found else str(e)).split())[:200]
        if not looks_pickled(path):  # an image renamed .ckpt, say: no attack, just the wrong file (and the
            # unpickler's reason, e.g. 'Unsupported operand 8', says nothing to the user)
            raise CheckpointError(f"{path}: {NOT_A_CHECKPOINT}") from None
        raise CheckpointError(
            f"{path}: refused to load: it holds pickled objects other than plain weights, which could run "
            f"code ({reason})"
        ) from None
    except Exception as e:  # the weights-only unpickler trips over junk with IndexError, KeyError, struct.error...
        if not looks_pickled(path):  # a text file, say: the unpickler's 'KeyError: 101' says nothing to the user
            raise CheckpointError(f"{path}: {NOT_A_CHECKPOINT}") from None
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        reason = f"{type(e).__name__}: {reason}" if reason else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None


def check_zip_checksums(path: Path) -> None:
    """A `torch.save` file is a zip whose members carry CRC-32 checksums, which `torch.load` does not verify: a
    damaged byte (a bad disk, an interrupted copy) would load as a wrong weight. Check them (a third of the load's
    time); a cut-off file fails here too, in words rather than miniz's."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return  # torch's legacy pickle format, or not a checkpoint: torch.load says what it is
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"{path}: a PyTorch checkpoint that is cut short or damaged (its zip archive does not open: {e}): copy "
            "or save it again"
        ) from None
    if damaged is not None:
        raise CheckpointError(
            f"{path}: damaged checkpoint: {damaged} does not match its CRC-32 checksum (the file changed after it "
            "was written)"
        )


def looks_pickled(path: Path) -> bool:
    """A torch.save zip, or a raw pickle (protocol 2+ opens with 0x80)."""
    with open(path, "rb") as f:
        first = f.read(1)
    return first == b"\x80" or zipfile.is_zipfile(path)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or a `CheckpointError` naming it."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object (found {type(config).__name__})")
    return config


def download(url: str) -> Path:
    """Fetch a URL once into torch's hub cache; the file is then read like a local one."""
    # The URL's hash keeps two files of the same name apart (every HF repo has a 'model.safetensors').
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / f"{digest}-{Path(urlparse(url).path).name}"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(cached), progress=False)
        except Exception as e:
            raise CheckpointError(f"{url}: download failed ({type(e).__name__}: {e})") from None
    return cached


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to, renamed over `path` when the block ends without an error and
    removed when it fails: readers see the old file or the new one, never a part of it. A good write also removes
    what killed writes of `path` left beside it (`remove_stale_temporaries`)."""
    temp = _temporary_name(path)
    try:
        yield temp
        os.replace(temp, path)  # atomic on POSIX and Windows, within one file system
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    remove_stale_temporaries(path)


@contextlib.contextmanager
def atomic_write_beside(path: Path) -> Iterator[Path]:
    """`atomic_write` for a writer that may put files of its own next to `path` (ONNX's external data,
    `<name>.data`): a temporary folder beside `path`, whose files are renamed into `path`'s folder when the block
    ends without an error, `path` itself last; the folder is removed either way."""
    folder = _temporary_name(path)
    folder.mkdir()
    try:
        yield folder / path.name
        for written in sorted(folder.iterdir(), key=lambda f: f.name == path.name):
            os.replace(written, path.parent / written.name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    remove_stale_temporaries(path)


def _temporary_name(path: Path) -> Path:
    # hidden, so that listings and `*.ckpt` patterns pass it by; the pid says whose it is, the hex keeps writers of
    # one process apart. `_TEMPORARY` must match exactly this
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


_TEMPORARY = r"\.{name}\.(\d+)-[0-9a-f]{{8}}\.tmp"


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries (files, or `atomic_write_beside`'s folders) that writes of `path` killed midway (SIGKILL,
    a power cut) left beside it: only names of exactly `atomic_write`'s pattern, and only those whose process has
    ended, so that a write still running in another process keeps its own. Returns what it removed."""
    pattern = re.compile(_TEMPORARY.format(name=re.escape(path.name)))
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _running(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


def _running(pid: int) -> bool:
    """Whether another process with this id is running; this process's own temporaries are never in use once its
    write has ended (and in a container, a restarted run often gets the id of the one that was killed)."""
    if pid == os.getpid():
        return False
    if os.name != "posix":
        return True  # Windows's os.kill(pid, 0) would send a Ctrl-C: keep what may be another writer's
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (EPERM): running
        return True
    return True


def short_list(items: list[str], limit: int = 8) -> str:
    """'a, b, c and 5 more': the first `limit` items, for one-line messages."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
