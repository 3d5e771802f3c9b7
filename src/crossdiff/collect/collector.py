"""`crossdiff collect`: run base and chat on the same tokens and cache the paired activations.

The records come from crossdiff.collect.paired (the path ``train --stream`` reads texts by
too), deterministically: sources in recipe order, documents in source order, batches of
``batch_size`` consecutive documents; a new shard starts whenever the next batch would not
fit in the open one. A sealed shard records where the next one starts
(source, document, tokens so far), so after a crash the same command re-opens the cache,
drops the unfinished shard and recomputes exactly the batches an uninterrupted run would
have computed: the finished cache is byte-identical (same machine and software).

Ranks (``rank``/``world_size``, or torchrun's RANK/WORLD_SIZE) collect the documents whose
index is congruent to their rank into ``OUT/rank-R``; the last rank to finish writes
``OUT/manifest.json`` joining them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from crossdiff.collect.answers import answered_sources
from crossdiff.cache.store import (
    MANIFEST,
    CacheWriter,
    PairedCache,
    check_same_settings,
    describe_profile,
    merge_ranks,
    rank_folder,
)
from crossdiff.collect.config import CollectConfig
from crossdiff.collect.paired import Step, load_pair, paired_records, rank_budget, validate
from crossdiff.errors import CrossdiffError
from crossdiff.locks import output_lock
from crossdiff.models import ResidualExtractor


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
    validate(config)
    folder = rank_folder(config.out, config.rank, config.world_size)
    with output_lock(folder, "collect"):  # two collects into one folder would interleave shards
        return _collect(config, folder, quiet)


def _collect(config: CollectConfig, folder: Path, quiet: bool) -> CollectSummary:
    start = time.perf_counter()
    if _already_complete(folder, config):
        return _finish(config, folder, start, new_tokens=0)
    pair = load_pair(config, quiet)
    extractor = ResidualExtractor(pair, config.layer)
    sources = answered_sources(config, pair, quiet=quiet)  # answers sources: the chat model answers their prompts first
    writer = _open_writer(config, folder, pair)
    already = writer.n_tokens
    budgets = [rank_budget(config, s.name) for s in config.sources]
    total = sum(budgets) if all(b is not None for b in budgets) else None
    progress = tqdm(total=total, initial=already, unit="tok", unit_scale=True, disable=quiet, desc="collect")
    try:
        _write(writer, paired_records(pair, extractor, config, sources, position=_indexed(writer.resume, config)), config, progress)
        writer.finish()
    finally:
        writer.close()
        progress.close()
    return _finish(config, folder, start, new_tokens=writer.n_tokens - already)


def _open_writer(config: CollectConfig, folder: Path, pair: Any) -> CacheWriter:
    """The cache writer of ``folder``, reopened after its last sealed shard if there is one."""
    return CacheWriter(
        folder,
        models=(pair.base_name, pair.chat_name),
        layer=config.layer,
        d_model=pair.d_model,
        sources=[s.name for s in config.sources],
        dtype=config.dtype,
        shard_tokens=config.shard_tokens,
        config=config.identity(),
        bos_token_id=pair.tokenizer.bos_token_id,
        special_token_ids=pair.tokenizer.all_special_ids,
    )


def _write(writer: CacheWriter, steps: Iterator[Step], config: CollectConfig, progress: Any) -> None:
    """Append each step's records, sealing a shard when the next batch would not fit and at
    the end of each source (each seal stores the position to resume from)."""
    for step in steps:
        source = config.sources[step.source]
        progress.set_postfix_str(source.name)
        records = step.records
        if records is None:
            if step.after["source_tokens"] == 0 and config.world_size == 1:
                reason = f"source {source.name!r} gave no tokens: is {source.path} empty (or its column)?"
                writer.stop(reason)  # train and analyze then say this, not "rerun the collect"
                raise CrossdiffError(reason)
            writer.seal(_named(step.after, config))
            continue
        if writer.room < len(records.acts):
            writer.seal(_named(step.before, config))
        writer.append(records.acts, token_ids=records.token_ids, doc_ids=records.doc_ids, positions=records.positions,
                      source_id=step.source, template=records.template)
        progress.update(len(records.acts))


def _named(position: dict[str, Any], config: CollectConfig) -> dict[str, Any]:
    """A position as the manifest stores it: the source by name, which a reader can check."""
    return {**position, "source": config.sources[position["source"]].name}


def _indexed(record: dict[str, Any] | None, config: CollectConfig) -> dict[str, Any] | None:
    """The manifest's last seal as a position (the source by index), or None for a new cache."""
    if not record:
        return None
    return {**record, "source": [s.name for s in config.sources].index(record["source"])}


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
