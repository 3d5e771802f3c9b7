"""Shuffled paired batches for training, with memory bounded by a window of shards.

Shuffling a cache of 100M tokens perfectly would need a permutation of all of them and
random reads across the whole cache. Like the paper (shuffling inside 1M-token shards),
we shuffle inside a *window*: each pass visits the shards in a fresh random order, takes
them ``window_shards`` at a time and reads the window's tokens in random order. Memory
holds one window's token indices plus one batch, whatever the cache size, and only
read-time selections (filters) ever drop tokens.

Sources can be mixed at a fixed ratio per batch (the paper: half pretraining, half chat
tokens). Each source is then its own stream of passes over its shards, so a smaller
source is re-read (in a new order) while a larger one is still in its first pass.

The position in the data is a handful of integers (:meth:`ShuffledPairLoader.state_dict`),
and every permutation is recomputed from the seed, so a resumed training run sees
exactly the batches the uninterrupted one would have seen.

For data-parallel training each rank builds the same loader with its ``rank``: all ranks
compute the same global batch of token indices (cheap) and each reads only its contiguous
part of them, so the parts are disjoint and together are exactly the batch one process
would read. The position is that of the global batches, so a run saved at one number of
ranks resumes at another.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossdiff.cache.batch import CacheBatch, concat_batches
from crossdiff.cache.store import LeftOut, PairedCache, ReadFilters
from crossdiff.devices import resolve_device
from crossdiff.train.distributed import DataParallel, rank_slice
from crossdiff.errors import CrossdiffError


class _ShardStream:
    """Tokens of some shards in windowed-shuffled order, pass after pass.

    Position: (pass, window, offset), offset counting tokens already taken from the
    window. Window contents and order are pure functions of (seed, stream, pass, window).
    """

    def __init__(
        self, cache: PairedCache, shards: list[int], window_shards: int, seed: int, stream_id: int,
        filters: ReadFilters | None,
    ):
        self.cache, self.shards, self.window_shards = cache, shards, window_shards
        self.seed, self.stream_id, self.filters = seed, stream_id, filters
        self.n_windows = math.ceil(len(shards) / window_shards)
        self.pass_ = self.window = self.offset = 0
        self._cached: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None
        self.left_out = LeftOut(filters)
        self.kept_sq_norms = np.zeros(2, np.float64)  # sum of ||x_m||^2 over the kept tokens
        if filters is None:
            self.tokens_per_pass = sum(cache.shards[s]["n_tokens"] for s in shards)
        else:  # one read of the small token records, shard by shard
            self.tokens_per_pass = 0
            for s in shards:
                records = np.asarray(cache.tokens(s))
                reasons = self._reasons(records)
                self.left_out.add(reasons, records["position"])
                kept = _kept(reasons, len(records))
                self.tokens_per_pass += int(kept.sum())
                self.kept_sq_norms += np.square(records["norm"][kept].astype(np.float64)).sum(axis=0)

    def _reasons(self, records: np.ndarray) -> dict[str, np.ndarray]:
        return self.filters.reasons(records["position"], records["token_id"], records["norm"],
                                    self.cache.manifest.get("bos_token_id"), self.cache.special_token_ids)

    def _keep(self, shard: int) -> np.ndarray:
        records = np.asarray(self.cache.tokens(shard))
        return _kept(self._reasons(records), len(records))

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.stream_id, *keys])

    def _window_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, row) of every kept token of the current window, in shuffled order."""
        key = (self.pass_, self.window)
        if self._cached is None or self._cached[0] != key:
            order = self._rng(self.pass_).permutation(self.shards)
            members = order[self.window * self.window_shards : (self.window + 1) * self.window_shards]
            # Checksums of the next window's shards are computed while this window trains.
            upcoming = order[(self.window + 1) * self.window_shards : (self.window + 2) * self.window_shards]
            self.cache.verify_ahead([int(i) for i in upcoming])
            shard_ids, rows = [], []
            for s in members:
                kept = np.flatnonzero(self._keep(s)) if self.filters else np.arange(self.cache.shards[s]["n_tokens"])
                shard_ids.append(np.full(len(kept), s, np.int32))
                rows.append(kept.astype(np.int64))
            shard_ids_all, rows_all = np.concatenate(shard_ids), np.concatenate(rows)
            perm = self._rng(self.pass_, self.window).permutation(len(rows_all))
            self._cached = (key, shard_ids_all[perm], rows_all[perm])
        return self._cached[1], self._cached[2]

    def take(self, n: int, within_pass: bool) -> tuple[np.ndarray, np.ndarray]:
        """Next ``n`` tokens as (shard indices, rows); fewer if ``within_pass`` and the pass ends."""
        shard_parts, row_parts, got = [], [], 0
        while got < n:
            if self.window == self.n_windows:  # pass finished
                if within_pass and got:
                    break
                self.pass_, self.window, self.offset = self.pass_ + 1, 0, 0
            shard_ids, rows = self._window_tokens()
            end = min(len(rows), self.offset + n - got)
            shard_parts.append(shard_ids[self.offset : end])
            row_parts.append(rows[self.offset : end])
            got += end - self.offset
            self.offset = end
            if self.offset == len(rows):
                self.window, self.offset = self.window + 1, 0
        if not shard_parts:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        return np.concatenate(shard_parts), np.concatenate(row_parts)

    def state(self) -> list[int]:
        return [self.pass_, self.window, self.offset]

    def set_state(self, state: list[int]) -> None:
        self.pass_, self.window, self.offset = (int(v) for v in state)


def _kept(reasons: dict[str, np.ndarray], n: int) -> np.ndarray:
    keep = np.ones(n, dtype=bool)
    for mask in reasons.values():
        keep &= ~mask
    return keep


class ShuffledPairLoader:
    """Iterable of shuffled :class:`CacheBatch` for training a crosscoder.

    Args:
        cache: a PairedCache or the path of one.
        batch_size: tokens per batch.
        source_ratio: e.g. ``{"fineweb": 0.5, "lmsys": 0.5}``: every batch holds these shares
            of each source (only listed sources are read). None: all tokens, one stream.
        window_shards: shards shuffled together; memory grows with it, not with the cache.
        seed: all shuffling derives from it.
        epochs: passes over the data (None: endless). With a source ratio an epoch is
            ``steps_per_epoch`` batches: as many as the scarcest source fills once.
        filters: tokens to leave out at read time (first positions, BOS, special tokens, norm
            outliers); None keeps every token. It is resolved on the cache: :attr:`token_filter`
            (store it with the crosscoder, as :attr:`normalization`), :attr:`left_out` counts.
        normalize: scale each model's activations by a constant so that E||x||^2 = d_model over
            the tokens it yields; the factors are :attr:`normalization` (store them with the crosscoder).
        drop_last: without a source ratio, drop each epoch's final partial batch.
        rank, world_size: yield only this rank's part of every global batch of
            ``batch_size`` tokens (data-parallel training; crossdiff.train.distributed).
    """

    def __init__(
        self,
        cache: PairedCache | str | Path,
        batch_size: int,
        *,
        source_ratio: dict[str, float] | None = None,
        window_shards: int = 4,
        seed: int = 0,
        epochs: int | None = 1,
        filters: ReadFilters | None = None,
        normalize: bool = False,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.cache = cache if isinstance(cache, PairedCache) else PairedCache(cache)
        if batch_size < 1:
            raise CrossdiffError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise CrossdiffError(f"rank must be in 0..world_size-1, got rank {rank} of {world_size}")
        self.rank, self.world_size = rank, world_size
        if window_shards < 1:
            raise CrossdiffError(f"window_shards must be positive, got {window_shards}")
        if epochs is not None and epochs < 1:
            raise CrossdiffError(f"epochs must be positive (or None for endless), got {epochs}")
        self.batch_size, self.window_shards, self.seed, self.epochs = batch_size, window_shards, seed, epochs
        self.filters = filters.resolve(self.cache.norm_profile()) if filters is not None else None
        self.drop_last, self.device, self.dtype = drop_last, device, dtype
        self.source_ratio = dict(source_ratio) if source_ratio else None
        # Every shard of a window is read for each batch: keep all their maps open.
        n_streams = len(self.source_ratio) if self.source_ratio else 1
        self.cache.max_open_shards = max(self.cache.max_open_shards, n_streams * window_shards)

        if self.source_ratio is None:
            self._streams = [self._stream(list(range(len(self.cache.shards))), 0)]
            self._per_batch = [batch_size]
            n = self._streams[0].tokens_per_pass
            self.steps_per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
        else:
            self._streams, self._per_batch = self._mixed_streams(self.source_ratio)
            self.steps_per_epoch = min(s.tokens_per_pass // b for s, b in zip(self._streams, self._per_batch))
        if self.steps_per_epoch == 0:
            raise CrossdiffError(
                f"the cache ({self.cache.path}) has too few tokens for one batch of {batch_size} "
                "after filters and source ratios"
            )
        # After the size check: an empty cache has no norms to normalise by.
        self.normalization: list[float] = self._normalization() if normalize else [1.0, 1.0]
        self._scale = torch.tensor(self.normalization, dtype=dtype, device=device).view(1, 2, 1)
        self.step = 0

    def _stream(self, shards: list[int], stream_id: int) -> _ShardStream:
        return _ShardStream(self.cache, shards, self.window_shards, self.seed, stream_id, self.filters)

    def _mixed_streams(self, ratio: dict[str, float]) -> tuple[list[_ShardStream], list[int]]:
        shares = source_shares(self.batch_size, ratio, self.cache.sources, "the cache")
        streams = []
        for name in shares:
            shards = [i for i, sh in enumerate(self.cache.shards) if sh["source"] == name]
            streams.append(self._stream(shards, self.cache.sources.index(name) + 1))
        return streams, list(shares.values())

    @property
    def token_filter(self) -> ReadFilters | None:
        """The filter as resolved on this cache (None: every token is used)."""
        return self.filters

    @property
    def left_out(self) -> LeftOut:
        """Tokens the filter leaves out of one pass, by reason and position."""
        total = LeftOut(self.filters)
        for stream in self._streams:
            total.merge(stream.left_out)
        return total

    def _normalization(self) -> list[float]:
        if self.filters is None or not self.left_out.total:
            # Every token is used: the manifest's exact float64 sums over all of them.
            stats = self.cache.stats()
            return [math.sqrt(self.cache.d_model / stats[m]["mean_sq_norm"]) for m in ("base", "chat")]
        # Over the tokens training reads, so that a few massive activations do not shrink the rest.
        sq = sum(s.kept_sq_norms for s in self._streams)
        n = sum(s.tokens_per_pass for s in self._streams)
        return [math.sqrt(self.cache.d_model * n / sq[m]) for m in range(2)]

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an endless loader (epochs=None) has no length")
        return self.epochs * self.steps_per_epoch

    def __iter__(self) -> Iterator[CacheBatch]:
        """Batches from the current position on (a fresh loader starts at step 0)."""
        while self.epochs is None or self.step < len(self):
            # Without a ratio, batches stop at the end of a pass, so each epoch is one pass.
            parts = [s.take(n, within_pass=self.source_ratio is None) for s, n in zip(self._streams, self._per_batch)]
            shard_ids = np.concatenate([p[0] for p in parts])
            rows = np.concatenate([p[1] for p in parts])
            if self.drop_last and len(rows) < self.batch_size:
                continue  # the pass's remainder; the next take starts a new pass
            self.step += 1  # before yielding: a state saved after this batch resumes after it
            part = rank_slice(len(rows), self.rank, self.world_size)
            yield self._gather(shard_ids[part], rows[part])

    def _gather(self, shard_ids: np.ndarray, rows: np.ndarray) -> CacheBatch:
        if len(rows) == 0:  # a rank's part of a last batch smaller than the number of ranks
            return self.cache.read(0, rows, device=self.device, dtype=self.dtype)
        pieces = []
        for shard in np.unique(shard_ids):
            # Sorted rows turn random access into forward reads through the memory map.
            pieces.append(
                self.cache.read(int(shard), np.sort(rows[shard_ids == shard]), device=self.device, dtype=self.dtype)
            )
        batch = concat_batches(pieces)
        if self.normalization != [1.0, 1.0]:
            batch = batch._replace(acts=batch.acts * self._scale)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The data position after the last batch yielded; plain data, JSON-friendly."""
        return {
            "step": self.step,
            "streams": [s.state() for s in self._streams],
            "seed": self.seed,
            "batch_size": self.batch_size,
            "source_ratio": self.source_ratio,
            "window_shards": self.window_shards,
            "epochs": self.epochs,
            "drop_last": self.drop_last,
            "filters": repr(self.filters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the loader must be built with the same settings."""
        now = self.state_dict()
        for key in ("seed", "batch_size", "source_ratio", "window_shards", "epochs", "drop_last", "filters"):
            if key in state and state[key] != now[key]:  # states saved before a key existed skip its check
                raise CrossdiffError(f"cannot resume the data loader: {key} was {state[key]!r}, now {now[key]!r}")
        if len(state["streams"]) != len(self._streams):
            raise CrossdiffError("cannot resume the data loader: the cache has different sources")
        self.step = int(state["step"])
        for stream, s in zip(self._streams, state["streams"]):
            stream.set_state(s)


def source_shares(batch_size: int, ratio: dict[str, float], sources: list[str], where: str) -> dict[str, int]:
    """Tokens per batch for each source ``ratio`` names, in ``sources`` order (independent of the
    dict's): proportional to the shares, largest remainders first, summing to ``batch_size``.
    The cache loader and the stream both split batches with it; ``where`` names the list of
    ``sources`` in errors ("the cache", "the recipe")."""
    unknown = sorted(set(ratio) - set(sources))
    if unknown:
        raise CrossdiffError(f"source_ratio names unknown source {unknown[0]!r}; {where} has {sources}")
    if any(not (r > 0) for r in ratio.values()):
        raise CrossdiffError(f"source_ratio shares must be positive, got {ratio}")
    names = [s for s in sources if s in ratio]
    total = sum(ratio.values())
    exact = [batch_size * ratio[s] / total for s in names]
    counts = [math.floor(x) for x in exact]
    # Largest remainders get the leftover tokens, so the counts always sum to batch_size.
    for i in sorted(range(len(names)), key=lambda i: counts[i] - exact[i])[: batch_size - sum(counts)]:
        counts[i] += 1
    for name, count in zip(names, counts):
        if count == 0:
            raise CrossdiffError(f"batch_size {batch_size} leaves no token for source {name!r}")
    return dict(zip(names, counts))


def loader_from_config(cache: PairedCache, config: Any) -> ShuffledPairLoader:
    """The loader a :class:`~crossdiff.train.trainer.TrainConfig` describes for ``cache``: the one
    place that reads ``config.data``, so `train` and `run` feed a trainer the same batches
    (this rank's part under torchrun; a bf16 cache read as stored by a bf16 run)."""
    data = config.data
    rank, world_size = _rank_and_world_size(config.device)
    return ShuffledPairLoader(
        cache, config.batch_size, source_ratio=data.source_ratio, window_shards=data.window_shards, seed=config.seed,
        epochs=data.epochs, filters=data.token_filter(), normalize=data.normalize, rank=rank, world_size=world_size,
        # A bf16 run reads a bf16 cache as it is stored (no float32 copy of the batch).
        dtype=torch.bfloat16 if config.precision == "bf16" and cache.dtype == "bfloat16" else torch.float32,
    )


def _rank_and_world_size(device: str) -> tuple[int, int]:
    """This process's rank among torchrun's processes (joining their group), or (0, 1)."""
    dp = DataParallel.from_environment(resolve_device(device))
    return (0, 1) if dp is None else (dp.rank, dp.world_size)
