"""Documents -> paired records: the one path `crossdiff collect` and `train --stream` share.

Both read a collect recipe's texts the same way (sources in recipe order, this rank's
documents in source order, ``batch_size`` documents per forward pass, each source cut at
exactly its token budget), run both models on each document batch and get a
:class:`~crossdiff.cache.batch.CacheBatch`. Both also resume the same way: a *position*
``{"source", "next_doc", "source_tokens"[, "done"]}`` says where the texts stand (the
source as an index into ``config.sources``; ``done`` once a source is used up), and
:func:`resume_point` turns it back into where to start reading. collect stores positions
in its manifest when it seals a shard (naming the source instead of counting it), the
stream in its checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any, ContextManager, NamedTuple

import torch

from crossdiff.cache.batch import CacheBatch
from crossdiff.cache.store import STORAGE_DTYPES
from crossdiff.collect.config import CollectConfig
from crossdiff.devices import local_device
from crossdiff.errors import CrossdiffError
from crossdiff.models import check_same_tokenization, context_length, load_model_pair, pad_batch
from crossdiff.texts import TextSourceConfig, TokenizedDoc, iter_documents


class Step(NamedTuple):
    """One document batch run through both models, or the end of a source."""

    source: int
    """Index into ``config.sources``."""
    records: CacheBatch | None
    """The batch's tokens, activations on the models' device in their dtype (None at the end of a source)."""
    before: dict[str, Any]
    """The position before this batch (collect seals a full shard there)."""
    after: dict[str, Any]
    """The position after it; ``done`` at the end of a source."""


def paired_records(pair: Any, extractor: Any, config: CollectConfig, sources: list[TextSourceConfig], *,
                   order: list[int] | None = None, position: dict[str, Any] | None = None,
                   lock: ContextManager[Any] | None = None) -> Iterator[Step]:
    """The records of ``sources`` (``order``: which of them, default all in recipe order) from
    ``position`` on (None: the start). ``lock`` is held around each forward pass."""
    order = list(range(len(sources))) if order is None else order
    max_len = fit_max_len(config.max_len, pair)
    tokenizer = pair.tokenizer
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    first, next_doc, tokens = resume_point(order, position)
    for source_index in order[first:]:
        start_doc, tokens = (next_doc, tokens) if source_index == order[first] else (0, 0)
        source = sources[source_index]
        docs = rank_documents(config, source, tokenizer, start_doc, max_len)
        last_doc = start_doc - 1
        for batch_index, batch in enumerate(doc_batches(docs, config.batch_size, rank_budget(config, source.name), tokens)):
            if batch_index == 0:  # both models must see the same ids for this source's texts
                check_same_tokenization(pair, batch)
            with lock if lock is not None else contextlib.nullcontext():
                records = forward(extractor, batch, source_index, pad_id)
            before = {"source": source_index, "next_doc": batch[0].doc_id, "source_tokens": tokens}
            tokens += len(records.acts)
            last_doc = batch[-1].doc_id
            yield Step(source_index, records, before, {"source": source_index, "next_doc": last_doc + 1, "source_tokens": tokens})
        end = {"source": source_index, "next_doc": last_doc + 1, "source_tokens": tokens}
        yield Step(source_index, None, end, {**end, "done": True})


def forward(extractor: Any, docs: list[TokenizedDoc], source_index: int, pad_id: int) -> CacheBatch:
    """Both models' activations on ``docs`` (one row per real token) with each token's record."""
    input_ids, attention_mask = pad_batch([doc.input_ids for doc in docs], pad_id)
    base, chat = extractor(input_ids, attention_mask)
    keep = attention_mask.bool()
    on_device = keep.to(base.device)
    return CacheBatch(
        acts=torch.stack([base[on_device], chat[on_device]], dim=1),
        token_ids=input_ids[keep].long(),
        doc_ids=torch.tensor([doc.doc_id for doc in docs for _ in doc.input_ids], dtype=torch.long),
        positions=torch.tensor([p for doc in docs for p in range(len(doc.input_ids))], dtype=torch.long),
        source_ids=torch.full((int(keep.sum()),), source_index, dtype=torch.long),
        template=torch.tensor([flag for doc in docs for flag in doc.template_mask], dtype=torch.bool),
    )


def resume_point(order: list[int], position: dict[str, Any] | None) -> tuple[int, int, int]:
    """(index into ``order``, first document, tokens already read from that source) from a position."""
    if position is None:
        return 0, 0, 0
    index = order.index(position["source"])
    if position.get("done"):
        return index + 1, 0, 0
    return index, position["next_doc"], position["source_tokens"]


def rank_budget(config: CollectConfig, source: str) -> int | None:
    """This rank's token budget for ``source`` (None: every token)."""
    budget = config.max_tokens.get(source) if isinstance(config.max_tokens, dict) else config.max_tokens
    if budget is None:
        return None
    # Split the source's budget over the ranks so that the parts add up exactly.
    r, w = config.rank, config.world_size
    return budget * (r + 1) // w - budget * r // w


def rank_documents(config: CollectConfig, source: TextSourceConfig, tokenizer: Any, first_doc: int,
                   max_len: int) -> Iterator[TokenizedDoc]:
    # Rows before the resume point and other ranks' rows are dropped before tokenizing.
    return iter_documents(
        source, tokenizer, max_len, start_doc=first_doc, rank=config.rank, world_size=config.world_size, bos=config.bos,
        holdout=config.holdout, part=config.part,
    )


def fit_max_len(max_len: int, pair: Any) -> int:
    """``max_len``, capped (with a warning) at the positions both models were built for."""
    limit = context_length(pair.base, pair.chat)
    if limit is not None and max_len > limit:
        warnings.warn(f"max_len {max_len} exceeds the models' max_position_embeddings ({limit}); "
                      f"documents are cut at {limit} tokens", UserWarning, stacklevel=3)
        return limit
    return max_len


def doc_batches(docs: Iterator[TokenizedDoc], batch_size: int, budget: int | None, tokens: int) -> Iterator[list[TokenizedDoc]]:
    """Consecutive documents, ``batch_size`` at a time, cut so the source stops at exactly ``budget`` tokens."""
    batch: list[TokenizedDoc] = []
    for doc in docs:
        if budget is not None:
            if tokens >= budget:
                break
            if tokens + len(doc.input_ids) > budget:  # a prefix of a document is a valid document
                keep = budget - tokens
                doc = dataclasses.replace(doc, input_ids=doc.input_ids[:keep], template_mask=doc.template_mask[:keep])
        tokens += len(doc.input_ids)
        batch.append(doc)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def load_pair(config: CollectConfig, quiet: bool):
    """The recipe's model pair on its device (transformers' loading bars off when ``quiet``)."""
    from transformers.utils import logging as hf_logging  # heavy: imported when models are loaded

    bars = hf_logging.is_progress_bar_enabled()
    if quiet:  # transformers' own "Loading weights" bars
        hf_logging.disable_progress_bar()
    try:
        return load_model_pair(config.base, config.chat, dtype=config.model_dtype, device=local_device(config.device))
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def validate(config: CollectConfig) -> None:
    """Raise CrossdiffError on settings neither collect nor a stream can run with."""
    names = [s.name for s in config.sources]
    if not names:
        raise CrossdiffError("collect needs at least one text source")
    if len(set(names)) != len(names):
        raise CrossdiffError(f"source names must be unique, got {names}")
    if isinstance(config.max_tokens, dict):
        unknown = sorted(set(config.max_tokens) - set(names))
        if unknown:
            raise CrossdiffError(f"max_tokens names unknown source {unknown[0]!r}; sources are {names}")
    budgets = config.max_tokens.values() if isinstance(config.max_tokens, dict) else [config.max_tokens]
    if any(b is not None and b < 1 for b in budgets):
        raise CrossdiffError(f"max_tokens must be positive, got {config.max_tokens}")
    if config.max_len < 1 or config.batch_size < 1:
        raise CrossdiffError(f"max_len and batch_size must be positive, got {config.max_len} and {config.batch_size}")
    if config.shard_tokens < config.batch_size * config.max_len:
        raise CrossdiffError(
            f"shard_tokens ({config.shard_tokens}) must hold one full batch: at least "
            f"batch_size x max_len = {config.batch_size * config.max_len}"
        )
    if not 0 <= config.rank < config.world_size:
        raise CrossdiffError(f"rank must be in 0..world_size-1, got rank {config.rank} of {config.world_size}")
    if not 0.0 <= config.holdout < 1.0:
        raise CrossdiffError(f"holdout must be a fraction in [0, 1), got {config.holdout}")
    if config.part == "heldout" and config.holdout == 0.0:
        raise CrossdiffError("part = 'heldout' needs holdout > 0 (the fraction of documents set aside)")
    if config.dtype not in STORAGE_DTYPES:
        raise CrossdiffError(f"dtype must be one of {list(STORAGE_DTYPES)}, got {config.dtype!r}")
