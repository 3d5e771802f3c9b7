"""Is the Hugging Face hub reachable? Asked once, so an offline machine fails at once.

huggingface_hub reads HF_HUB_OFFLINE when it is imported and otherwise retries an
unreachable hub five times with back-off (about 30 s) for every file it looks for. A
name that is not a local folder is therefore looked up with ``local_files_only=True``
(cache only, no network) whenever HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set now, or
one quick connection to the hub fails.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

_TRUE = {"1", "true", "yes", "on"}


def offline() -> bool:
    """True when the environment says offline or the hub cannot be reached (asked once)."""
    if any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    return not _reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


def local_only(name_or_path: str | Path) -> bool:
    """Whether loading ``name_or_path`` must stay off the network (a local folder never needs it)."""
    return not Path(name_or_path).expanduser().is_dir() and offline()


@functools.lru_cache(maxsize=4)
def _reachable(endpoint: str, timeout: float = 3.0) -> bool:
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
