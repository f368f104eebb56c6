"""Reaching the Hugging Face Hub: a Hub this machine cannot reach fails in a second, the cache still serving,
instead of a minute of huggingface_hub's retries."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit


def hub_unreachable(timeout: float = 2.0) -> str | None:
    """Why the Hub (HF_ENDPOINT) cannot be reached, from a short TCP connect to its host; None when it can, or
    when a proxy stands between (only the proxy knows)."""
    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (80 if url.scheme == "http" else 443)
    if urllib.request.getproxies() and not urllib.request.proxy_bypass(host):
        return None
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{constants.ENDPOINT} is unreachable ({e.strerror or e})"
    return None


@contextmanager
def hub_offline(enabled: bool = True) -> Iterator[None]:
    """huggingface_hub's offline mode (HF_HUB_OFFLINE=1) for a while: files come from the cache, no request is made."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE  # read at import from the environment; is_offline_mode() reads it per request
    constants.HF_HUB_OFFLINE = saved or enabled
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved
