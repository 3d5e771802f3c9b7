"""Resuming `crossdiff causal`: batches already scored survive an interruption.

Scoring goes batch by batch over the conversations sorted by length. After a batch (at
most every ``every_s`` seconds, and always after the last one) the per-conversation KL
sums and token counts so far are written atomically to a progress file beside the output
folder, with a fingerprint of everything that decides the numbers: the crosscoder's
weights, the models, the layer, the conversations' tokens and masks, the latent sets and
the batch settings. A rerun with the same fingerprint loads the sums and skips the batches
already done; the remaining sums are added in the same order as in one go, and JSON keeps
every float exactly, so a resumed run writes the same numbers as an uninterrupted one. A
progress file with another fingerprint belongs to another job and is started over. The
file is removed once the outputs are written.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from crossdiff.causal.kl import KLAccumulator
from crossdiff.files import write_text_atomic


def progress_path(out: Path) -> Path:
    """Beside the output folder, not in it: the folder holds only finished files."""
    return out.parent / f".{out.name}.progress.json"


def fingerprint(parts: dict[str, Any], crosscoder: Any, conversations: list[Any]) -> str:
    """sha256 of the settings, the crosscoder's parameters and the conversations' tokens and masks."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for name, tensor in sorted(crosscoder.state_dict().items()):
        # Every k-th value (about 256k per tensor): exact enough to tell crosscoders apart, cheap for big ones.
        flat = tensor.detach().flatten()
        step = max(1, flat.numel() // (1 << 18))
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat[::step].to("cpu", torch.float64).numpy().tobytes())
    for conversation in conversations:
        digest.update(json.dumps([conversation.index, conversation.input_ids, conversation.template, conversation.assistant]).encode())
    return digest.hexdigest()


class ScoringProgress:
    """Load, save and remove the progress file of one scoring job."""

    def __init__(self, path: Path, job: str, every_s: float = 30.0):
        self.path, self.job, self.every_s = path, job, every_s
        self._saved_at = time.monotonic()

    def load(self) -> tuple[int, KLAccumulator] | None:
        """(batches done, their sums) of this job, or None to start from the first batch."""
        if not self.path.is_file():
            return None
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # written atomically, so unreadable means not ours to trust: start over
        if state.get("job") != self.job:
            return None
        return int(state["batches_done"]), KLAccumulator.from_state(state["accumulator"])

    def save(self, batches_done: int, accumulator: KLAccumulator, *, force: bool = False) -> None:
        if not force and time.monotonic() - self._saved_at < self.every_s:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {"job": self.job, "batches_done": batches_done, "accumulator": accumulator.state()}
        write_text_atomic(self.path, json.dumps(state))
        self._saved_at = time.monotonic()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
