"""Devices: one parser and one default for every stage.

Every config's ``device`` defaults to :data:`DEFAULT_DEVICE`, ``auto``: the GPU when there is
one, else the CPU; under torchrun, the GPU of the process's local rank. One rule, so a recipe
run on a GPU machine never leaves one stage on the CPU by accident.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from crossdiff.errors import CrossdiffError

if TYPE_CHECKING:
    import torch

DEFAULT_DEVICE = "auto"
DEVICE_HELP = "cpu, cuda, cuda:N, mps or auto (default: the GPU if any, under torchrun the local rank's)"


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device a config's ``device`` names, for this process (see the module's rule)."""
    import torch  # deferred: configs and CLIs name DEFAULT_DEVICE without loading torch

    return parse_device(device if isinstance(device, torch.device) else local_device(device))


def local_device(device: str) -> str:
    """Under torchrun, ``auto`` and ``cuda`` mean the GPU of this process's local rank."""
    import torch  # deferred: see resolve_device

    if device in ("auto", "cuda") and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def parse_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or ``"auto"`` (CUDA if present) -> torch device."""
    import torch  # deferred: see resolve_device

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise CrossdiffError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise CrossdiffError(f"device {device!r} requested but CUDA is not available on this machine")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise CrossdiffError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise CrossdiffError(f"device {device!r} requested but MPS is not available on this machine")
    return parsed
