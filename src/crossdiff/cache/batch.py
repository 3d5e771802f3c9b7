"""The one batch record: paired activations and the token each row belongs to.

Every stage passes tokens in this shape: the cache reads them (``PairedCache.read``,
``iter_batches``), collect and ``train --stream`` compute them from documents
(crossdiff.collect.paired), the training loaders yield them, and analysis reads them
(``analysis.pipeline.TensorSource`` included). A stream's checkpoint stores its shuffle
buffer as ``batch._asdict()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch


class CacheBatch(NamedTuple):
    """A batch of paired activations with the token each one belongs to."""

    acts: torch.Tensor
    """[B, 2, d] activations, base = 0, chat = 1 (float32 unless asked otherwise)."""
    token_ids: torch.Tensor
    """[B] int64 token ids."""
    doc_ids: torch.Tensor
    """[B] int64 index of the document within its source."""
    positions: torch.Tensor
    """[B] int64 position within the document (0 = first token, the BOS if the tokenizer adds one)."""
    source_ids: torch.Tensor
    """[B] int64 index into ``PairedCache.sources``."""
    template: torch.Tensor
    """[B] bool, True on chat-template tokens."""

    def select(self, rows: Any) -> CacheBatch:
        """The rows ``rows`` (a slice, an index tensor or a boolean mask) of every field."""
        return CacheBatch(*(field[rows] for field in self))

    def to(self, device: torch.device | str) -> CacheBatch:
        return CacheBatch(*(field.to(device) for field in self))


RECORDS = CacheBatch._fields[1:]
"""The per-token fields besides the activations."""


def empty_batch(n: int, d_model: int, dtype: torch.dtype) -> CacheBatch:
    """``n`` uninitialised rows (activations of ``dtype``, records int64 and bool)."""
    return CacheBatch(torch.empty(n, 2, d_model, dtype=dtype),
                      *(torch.empty(n, dtype=torch.bool if name == "template" else torch.long) for name in RECORDS))


def concat_batches(parts: Sequence[CacheBatch]) -> CacheBatch:
    """The rows of ``parts`` one after the other (the part itself when there is one)."""
    if len(parts) == 1:
        return parts[0]
    return CacheBatch(*(torch.cat(fields) for fields in zip(*parts)))
