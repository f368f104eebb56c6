"""How a `vit` command ends besides returning: SIGTERM raised as an exception, as Python raises KeyboardInterrupt for
Ctrl-C, so that cleanup runs and one line is printed; and writes to standard output that fail (a full disk) told
apart from a reader that went away (`| head`) and from an OSError of reading an input. No torch here: `vit.cli`
imports it before any heavy import."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class OutputError(Exception):
    """Standard output could not be written (a full disk, a file-size limit); not a reader that went away."""


class CheckedOutput:
    """A text stream whose write errors, but for a closed pipe (`| head`), are `OutputError`: told apart from
    an OSError of reading an input or a checkpoint."""

    def __init__(self, stream: Any):
        self._stream = stream
        self.written = False  # whether anything was handed to the stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def write(self, text: str) -> int:
        self.written = True
        return self._checked(self._stream.write, text)

    def writelines(self, lines: Any) -> None:
        self.written = True
        return self._checked(self._stream.writelines, lines)

    def flush(self) -> None:
        return self._checked(self._stream.flush)

    @staticmethod
    def _checked(write: Callable[..., Any], *args: Any) -> Any:
        try:
            return write(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise OutputError(f"cannot write the output ({e.strerror or e})") from None


def stdout_to_devnull() -> None:
    """Python's recipe after a failed write to stdout: point it at devnull, so that the flush at exit, of what is
    still buffered, does not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class Terminated(BaseException):
    """SIGTERM (`kill`, `timeout`, a batch scheduler), raised as Python raises KeyboardInterrupt for Ctrl-C; not an
    Exception, which reading an image turns into that image's error."""


@contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """Inside, SIGTERM raises `Terminated`, so that the output written so far is flushed and the run ends in one
    line. (vit.predict's DataLoader workers end quietly on theirs.)"""

    def handler(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
