"""`crossdiff collect`: run base and chat on the same tokens and cache the paired activations.

The loop is deliberately deterministic: sources in recipe order, documents in source
order, batches of ``batch_size`` consecutive documents, and a new shard whenever the next
batch would not fit in the open one. A sealed shard records where the next one starts
(source, document, tokens so far), so after a crash the same command re-opens the cache,
drops the unfinished shard and recomputes exactly the batches an uninterrupted run would
have computed: the finished cache is byte-identical (same machine and software).

Ranks (``rank``/``world_size``, or torchrun's RANK/WORLD_SIZE) collect the documents whose
index is congruent to their rank into ``OUT/rank-R``; the last rank to finish writes
``OUT/manifest.json`` joining them.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crossdiff.collect.answers import answered_sources
from crossdiff.cache.store import (
    MANIFEST,
    STORAGE_DTYPES,
    CacheWriter,
    PairedCache,
    check_same_settings,
    describe_profile,
    merge_ranks,
    rank_folder,
)
from crossdiff.collect.config import CollectConfig
from crossdiff.devices import local_device
from crossdiff.errors import CrossdiffError
from crossdiff.locks import output_lock
from crossdiff.texts import TextSourceConfig, TokenizedDoc, iter_documents


@dataclass
class CollectSummary:
    path: Path
    tokens_per_source: dict[str, int]  # this rank's tokens
    shards: int
    bytes_on_disk: int
    seconds: float
    new_tokens: int  # collected by this call (the rest was there already)
    merged: bool = False  # whether OUT/manifest.json now covers every rank
    norms: dict[str, Any] | None = None  # the cache's norm profile: median norms, massive activations (cache.norm_profile)
    world_size: int = 1

    def __str__(self) -> str:
        rate = self.new_tokens / self.seconds if self.seconds > 0 else 0.0
        per_source = ", ".join(f"{name} {n:,}" for name, n in self.tokens_per_source.items())
        lines = [
            f"cache: {self.path}",
            f"tokens: {sum(self.tokens_per_source.values()):,} ({per_source})",
            f"shards: {self.shards}, {self.bytes_on_disk / 2**20:,.1f} MiB on disk",
            f"this run: {self.new_tokens:,} tokens in {self.seconds:,.1f} s ({rate:,.0f} tokens/s)",
        ]
        if self.norms is not None:
            lines.append(describe_profile(self.norms, sum(self.tokens_per_source.values())))
        if self.world_size > 1:
            lines.append(f"all {self.world_size} ranks done: {self.path.parent}/{MANIFEST} written" if self.merged
                         else "other ranks still running")
        return "\n".join(lines)


def collect(config: CollectConfig, *, quiet: bool = False) -> CollectSummary:
    """Collect (or resume collecting) the cache described by ``config``."""
    _validate(config)
    folder = rank_folder(config.out, config.rank, config.world_size)
    with output_lock(folder, "collect"):  # two collects into one folder would interleave shards
        return _collect(config, folder, quiet)


def _collect(config: CollectConfig, folder: Path, quiet: bool) -> CollectSummary:
    start = time.perf_counter()
    if _already_complete(folder, config):
        return _finish(config, folder, start, new_tokens=0)

    from crossdiff.models import ResidualExtractor, check_same_tokenization, pad_batch

    pair = _load_pair(config, quiet)
    max_len = _fit_max_len(config.max_len, pair)
    extractor = ResidualExtractor(pair, config.layer)
    tokenizer = pair.tokenizer
    sources = answered_sources(config, pair, quiet=quiet)  # answers sources: the chat model answers their prompts first
    writer = CacheWriter(
        folder,
        models=(pair.base_name, pair.chat_name),
        layer=config.layer,
        d_model=pair.d_model,
        sources=[s.name for s in config.sources],
        dtype=config.dtype,
        shard_tokens=config.shard_tokens,
        config=config.identity(),
        bos_token_id=tokenizer.bos_token_id,
        special_token_ids=tokenizer.all_special_ids,
    )
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    first_source, next_doc, source_tokens = _resume_point(writer, config)
    already = writer.n_tokens
    budgets = [_rank_budget(config, s.name) for s in config.sources]
    total = sum(budgets) if all(b is not None for b in budgets) else None

    from tqdm import tqdm

    progress = tqdm(total=total, initial=already, unit="tok", unit_scale=True, disable=quiet, desc="collect")
    try:
        for index in range(first_source, len(config.sources)):
            source = sources[index]
            progress.set_postfix_str(source.name)
            tokens = source_tokens if index == first_source else 0
            docs = _rank_documents(config, source, tokenizer, next_doc if index == first_source else 0, max_len)
            last_doc = -1
            for batch_index, batch in enumerate(_batches(docs, config.batch_size, budgets[index], tokens)):
                if batch_index == 0:  # both models must see the same ids for this source's texts
                    check_same_tokenization(pair, batch)
                n = sum(len(doc.input_ids) for doc in batch)
                if writer.room < n:
                    writer.seal({"source": source.name, "next_doc": batch[0].doc_id, "source_tokens": tokens})
                input_ids, attention_mask = pad_batch([doc.input_ids for doc in batch], pad_id)
                base, chat = extractor(input_ids, attention_mask)
                keep = attention_mask.bool().to(base.device)
                writer.append(
                    torch.stack([base[keep], chat[keep]], dim=1),
                    token_ids=input_ids[attention_mask.bool()],
                    doc_ids=[doc.doc_id for doc in batch for _ in doc.input_ids],
                    positions=[p for doc in batch for p in range(len(doc.input_ids))],
                    source_id=index,
                    template=[flag for doc in batch for flag in doc.template_mask],
                )
                tokens += n
                last_doc = batch[-1].doc_id
                progress.update(n)
            if tokens == 0 and config.world_size == 1:
                reason = f"source {source.name!r} gave no tokens: is {source.path} empty (or its column)?"
                writer.stop(reason)  # train and analyze then say this, not "rerun the collect"
                raise CrossdiffError(reason)
            writer.seal({"source": source.name, "next_doc": last_doc + 1, "source_tokens": tokens, "done": True})
        writer.finish()
    finally:
        writer.close()
        progress.close()
    return _finish(config, folder, start, new_tokens=writer.n_tokens - already)


def _load_pair(config: CollectConfig, quiet: bool):
    from transformers.utils import logging as hf_logging

    from crossdiff.models import load_model_pair

    bars = hf_logging.is_progress_bar_enabled()
    if quiet:  # transformers' own "Loading weights" bars
        hf_logging.disable_progress_bar()
    try:
        return load_model_pair(config.base, config.chat, dtype=config.model_dtype, device=local_device(config.device))
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _validate(config: CollectConfig) -> None:
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


def _already_complete(folder: Path, config: CollectConfig) -> bool:
    """Whether ``folder`` holds the finished cache of ``config`` (then no model is needed)."""
    if not (folder / MANIFEST).is_file():
        return False
    cache = PairedCache(folder, allow_incomplete=True)
    if cache.n_tokens == 0 and not cache.shards:
        # A first run that failed before storing anything (a wrong column, say): nothing to keep,
        # so the corrected command may start afresh with its own settings.
        (folder / MANIFEST).unlink()
        return False
    # Refuse other settings before any model is loaded (that can take minutes).
    check_same_settings(cache.manifest, {"layer": config.layer, "config": config.identity()}, folder)
    if cache.manifest["complete"]:
        cache.verify()  # a rerun over a finished cache is the moment to say it is damaged
    return bool(cache.manifest["complete"])


def _resume_point(writer: CacheWriter, config: CollectConfig) -> tuple[int, int, int]:
    """(source index, first document, tokens already stored for that source)."""
    record = writer.resume
    if not record:
        return 0, 0, 0
    index = [s.name for s in config.sources].index(record["source"])
    if record.get("done"):
        return index + 1, 0, 0
    return index, record["next_doc"], record["source_tokens"]


def _rank_budget(config: CollectConfig, source: str) -> int | None:
    budget = config.max_tokens.get(source) if isinstance(config.max_tokens, dict) else config.max_tokens
    if budget is None:
        return None
    # Split the source's budget over the ranks so that the parts add up exactly.
    r, w = config.rank, config.world_size
    return budget * (r + 1) // w - budget * r // w


def _rank_documents(config: CollectConfig, source: TextSourceConfig, tokenizer: Any, first_doc: int,
                    max_len: int | None = None) -> Iterator[TokenizedDoc]:
    # Rows before the resume point and other ranks' rows are dropped before tokenizing.
    return iter_documents(
        source, tokenizer, config.max_len if max_len is None else max_len, start_doc=first_doc, rank=config.rank, world_size=config.world_size, bos=config.bos,
        holdout=config.holdout, part=config.part,
    )


def _fit_max_len(max_len: int, pair: Any) -> int:
    """``max_len``, capped (with a warning) at the positions both models were built for."""
    from crossdiff.models import context_length

    limit = context_length(pair.base, pair.chat)
    if limit is not None and max_len > limit:
        warnings.warn(f"max_len {max_len} exceeds the models' max_position_embeddings ({limit}); "
                      f"documents are cut at {limit} tokens", UserWarning, stacklevel=3)
        return limit
    return max_len


def _batches(docs: Iterator[TokenizedDoc], batch_size: int, budget: int | None, tokens: int) -> Iterator[list[TokenizedDoc]]:
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


def _finish(config: CollectConfig, folder: Path, start: float, *, new_tokens: int) -> CollectSummary:
    merged = config.world_size > 1 and merge_ranks(config.out, config.world_size)
    cache = PairedCache(folder)
    size = sum(f.stat().st_size for s in cache.shards for f in (folder / s["name"]).iterdir())
    summary = CollectSummary(
        path=folder,
        tokens_per_source={name: cache.manifest["tokens_per_source"][name] for name in cache.sources},
        shards=len(cache.shards),
        bytes_on_disk=size,
        seconds=time.perf_counter() - start,
        new_tokens=new_tokens,
        merged=merged,
        world_size=config.world_size,
        norms=cache.norm_profile(),
    )
    return summary  # printed by the caller (collect's CLI whatever --quiet; the runner unless quiet)


# ----------------------------------------------------------------------------- CLI
