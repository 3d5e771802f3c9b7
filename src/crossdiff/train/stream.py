"""Training without a cache: both models run and the crosscoder trains in one process.

``PairedActivationStream`` is a drop-in for :class:`crossdiff.train.loader.ShuffledPairLoader`:
an iterable of :class:`crossdiff.cache.batch.CacheBatch` with ``normalization``, ``state_dict``
and ``load_state_dict``, so :class:`crossdiff.train.trainer.Trainer` trains from it unchanged.

Where the batches come from:

* Texts are read exactly as ``crossdiff collect`` reads them (same sources, documents,
  truncation, token budgets, chat-template masks, rank split), through the same path
  (crossdiff.collect.paired), which also gives the positions a resumed run starts from.
* A background thread per stream runs both models on consecutive document batches and
  queues the paired activations, rounded to the recipe's storage dtype like the cache.
  The token filter (crossdiff.cache.store.ReadFilters) is resolved on the first full buffer
  (median norms, whether first positions are massive) and applied from then on; its
  parts that need no norms (BOS, special tokens, first positions set to ``drop``) apply
  as the tokens arrive.
* The trainer's thread moves whole queued batches into a *shuffle buffer* of
  ``buffer_tokens`` tokens until it is full, then draws a batch of tokens at random from
  it (the generator of step s is seeded by (seed, stream, s)). With ``source_ratio`` each
  source has its own buffer, sized by its share, and every batch holds the same shares as
  the cache loader's.

Because the buffer is always refilled to the same size before a draw and the draw depends
only on the seed and the step, the batches do not depend on how far ahead the background
thread happens to be. The state saved with each checkpoint is the buffer's contents plus,
per stream, the text position after the last document batch moved into the buffer; a
resumed run reopens the texts there (the documents the thread had computed ahead are
recomputed), so no text is trained on twice or skipped.

The normalisation (E||x||^2 = d_model per model) is estimated on the kept tokens of the
first full buffer, not on every token as the cache loader does; it is stored in the state
and the crosscoder, as is the resolved filter.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossdiff.cache.batch import CacheBatch, concat_batches, empty_batch
from crossdiff.cache.store import STORAGE_DTYPES, LeftOut, ReadFilters, norm_profile
from crossdiff.collect.answers import answered_sources
from crossdiff.collect.paired import load_pair, paired_records, validate
from crossdiff.config import from_dict, to_dict
from crossdiff.devices import resolve_device
from crossdiff.models import ResidualExtractor
from crossdiff.train.config import StreamConfig  # noqa: F401 (re-exported)
from crossdiff.train.loader import source_shares
from crossdiff.train.trainer import STATE_NAME, Trainer, newest_checkpoint
from crossdiff.errors import CrossdiffError
from crossdiff.files import load_tensors
from crossdiff.texts import recorded
from crossdiff.train.distributed import DataParallel, rank_slice

_END = "end"


class _Buffer:
    """Preallocated rows of paired activations and their token records; removal fills holes
    with rows from the end, so a draw costs O(batch), not O(buffer)."""

    def __init__(self, capacity: int, d_model: int, dtype: torch.dtype):
        self.rows = empty_batch(capacity, d_model, dtype)
        self.size = 0

    def view(self) -> CacheBatch:
        """The filled rows (no copy)."""
        return self.rows.select(slice(0, self.size))

    def append(self, batch: CacheBatch) -> None:
        n = batch.acts.shape[0]
        if self.size + n > self.rows.acts.shape[0]:
            raise RuntimeError("shuffle buffer overflow")  # capacity leaves room for one document batch
        for stored, new in zip(self.rows, batch):
            stored[self.size : self.size + n] = new
        self.size += n

    def take(self, rows: np.ndarray) -> CacheBatch:
        n, k = self.size, len(rows)
        out = self.rows.select(torch.from_numpy(rows))  # indexing copies
        taken = np.zeros(n, dtype=bool)
        taken[rows] = True
        holes = torch.from_numpy(np.sort(rows[rows < n - k]))
        movers = torch.from_numpy(np.flatnonzero(~taken[n - k :]) + (n - k))
        for tensor in self.rows:
            tensor[holes] = tensor[movers]
        self.size = n - k
        return out

    def keep(self, mask: torch.Tensor) -> None:
        """Keep only the rows where ``mask`` is True (order preserved)."""
        kept = int(mask.sum())
        for tensor in self.rows:
            tensor[:kept] = tensor[: self.size][mask]
        self.size = kept

    def state(self) -> dict[str, torch.Tensor]:
        return {name: tensor.clone() for name, tensor in self.view()._asdict().items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.size = 0
        self.append(CacheBatch(**state))


class PairedActivationStream:
    """Shuffled paired batches computed on the fly from the texts of a collect recipe.

    Args:
        collect: the CollectConfig whose models, layer, sources, budgets, max_len,
            batch_size (documents per forward pass), storage dtype and rank it follows;
            its ``out`` is not used.
        batch_size: tokens per training batch.
        buffer_tokens: shuffle buffer size, all sources together.
        source_ratio / seed / filters / normalize: as for ShuffledPairLoader (filters None:
            every token).
        pair: an already loaded ModelPair (else the models are loaded here).
    """

    def __init__(
        self,
        collect: Any,
        batch_size: int,
        *,
        buffer_tokens: int = 2**20,
        source_ratio: dict[str, float] | None = None,
        seed: int = 0,
        filters: ReadFilters | None = None,
        normalize: bool = True,
        prefetch_batches: int = 4,
        pair: Any = None,
        quiet: bool = True,
        data_parallel: Any = None,
    ):
        validate(collect)
        if batch_size < 1:
            raise CrossdiffError(f"batch_size must be positive, got {batch_size}")
        if buffer_tokens < batch_size:
            raise CrossdiffError(f"the shuffle buffer ({buffer_tokens} tokens) must hold at least one batch ({batch_size})")
        self.collect, self.batch_size, self.buffer_tokens, self.seed = collect, batch_size, buffer_tokens, seed
        self.filters, self.normalize, self.prefetch = filters, normalize, prefetch_batches
        # The parts of the filter that need no norms, applied by the feeds as tokens arrive.
        self._static_filter = None if filters is None else dataclasses.replace(
            filters, first_position="keep" if filters.first_position == "auto" else filters.first_position,
            max_norm_ratio=None, max_norm=None)
        self.source_ratio = dict(source_ratio) if source_ratio else None
        self.stream_sources, self.per_batch = self._split_sources()  # before the models load: a typo fails fast
        self.data_parallel = data_parallel  # ranks agree on one normalisation
        self.pair = pair if pair is not None else load_pair(collect, quiet)
        self.text_sources = answered_sources(collect, self.pair, quiet=quiet)  # answers sources: answered first, then read as chat
        self.extractor = ResidualExtractor(self.pair, collect.layer)
        self.d_model = self.pair.d_model
        self.model_names = [self.pair.base_name, self.pair.chat_name]
        self.storage_dtype = STORAGE_DTYPES[collect.dtype][1]
        self.empty = empty_batch(0, self.d_model, self.storage_dtype)  # what a feed queues at the end of a source
        tokenizer = self.pair.tokenizer
        self.bos_token_id = tokenizer.bos_token_id
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

        chunk = collect.batch_size * collect.max_len  # most tokens one document batch can add
        self.capacity = [max(count, round(buffer_tokens * count / batch_size)) for count in self.per_batch]
        self._buffers = [_Buffer(cap + chunk, self.d_model, self.storage_dtype) for cap in self.capacity]
        self.positions: list[dict[str, Any] | None] = [None] * len(self.per_batch)
        self.ended = [False] * len(self.per_batch)
        self.step = 0
        self.normalization: list[float] | None = None
        self.token_filter: ReadFilters | None = None
        """The filter resolved on the first full buffer (None before, or without a filter)."""
        self.left_out = LeftOut(filters)
        self._count_lock = threading.Lock()  # the feeds count what they leave out too
        self._feeds: list[_Feed] = []
        self._lock = threading.Lock()  # one forward at a time: the capture hooks sit on shared blocks

    def _split_sources(self) -> tuple[list[list[int]], list[int]]:
        """Each stream's sources (indices into the recipe's) and its tokens per batch."""
        names = [s.name for s in self.collect.sources]
        if self.source_ratio is None:  # one stream: every source, in recipe order, like the cache
            return [list(range(len(names)))], [self.batch_size]
        shares = source_shares(self.batch_size, self.source_ratio, names, "the recipe")
        return [[names.index(name)] for name in shares], list(shares.values())

    # ------------------------------------------------------------------ iteration
    def prime(self) -> list[float]:
        """Fill the buffer (starting the background threads) and fix the normalisation."""
        self._fill()
        return self.normalization

    def __iter__(self) -> Iterator[CacheBatch]:
        try:
            while True:
                self._fill()
                if any(buf.size < count for buf, count in zip(self._buffers, self.per_batch)):
                    return  # a source's texts are used up: no full batch is left
                parts = [buf.take(self._draw(i, buf.size, count)) for i, (buf, count) in enumerate(zip(self._buffers, self.per_batch))]
                self.step += 1  # before yielding: a state saved after this batch resumes after it
                yield self._batch(parts)
        finally:
            self.close()

    def _draw(self, stream: int, size: int, count: int) -> np.ndarray:
        return np.random.default_rng([self.seed, stream, self.step]).choice(size, count, replace=False)

    def _batch(self, parts: list[CacheBatch]) -> CacheBatch:
        batch = concat_batches(parts)
        acts = batch.acts.float()
        if self.normalization != [1.0, 1.0]:
            acts = acts * torch.tensor(self.normalization).view(1, 2, 1)
        return batch._replace(acts=acts)

    def _fill(self) -> None:
        """Move queued document batches into each buffer until it holds its share of buffer_tokens."""
        if not self._feeds:
            self._start_feeds()
        for i, (buf, feed) in enumerate(zip(self._buffers, self._feeds)):
            while buf.size < self.capacity[i] and not self.ended[i]:
                item = feed.queue.get()
                if isinstance(item, BaseException):
                    self.close()
                    if isinstance(item, CrossdiffError):
                        raise CrossdiffError(str(item)) from None
                    raise item
                kind, chunk, position = item
                if kind == _END:
                    self.ended[i] = True
                    continue
                if self.token_filter is not None:
                    chunk = _select(chunk, torch.from_numpy(self._keep(self.token_filter, chunk)))
                buf.append(chunk)
                self.positions[i] = position
        if self.normalization is None:
            self._calibrate()

    def _calibrate(self) -> None:
        """The token filter (resolved on the first full buffer) and the normalisation of its kept tokens."""
        if sum(buf.size for buf in self._buffers) == 0:
            raise CrossdiffError("the texts gave no token to train on")
        if self.filters is not None:
            profile = norm_profile([{"norm": _norms(rows.acts), "position": rows.positions.numpy()}
                                    for rows in (buf.view() for buf in self._buffers)])
            self.token_filter = self.filters.resolve(profile)
            for buf in self._buffers:
                buf.keep(torch.from_numpy(self._keep(self.token_filter, buf.view())))
        norms = torch.cat([torch.linalg.vector_norm(b.view().acts, dim=-1, dtype=torch.float64) for b in self._buffers])
        if norms.shape[0] == 0:
            raise CrossdiffError("the token filter left no token of the first buffer to train on")
        sums = torch.cat([(norms * norms).sum(dim=0), torch.tensor([float(norms.shape[0])], dtype=torch.float64)])
        if self.data_parallel is not None:  # every rank's first buffer, so all ranks scale alike
            sums = self.data_parallel.sum_(sums.to(self.data_parallel.device)).cpu()
        mean_sq = (sums[:2] / sums[2]).tolist()
        self.normalization = [math.sqrt(self.d_model / m) for m in mean_sq] if self.normalize else [1.0, 1.0]

    def _keep(self, token_filter: ReadFilters, chunk: CacheBatch, *, arriving: bool = False) -> np.ndarray:
        """Which of a chunk's tokens ``token_filter`` keeps; counts the others in :attr:`left_out`
        (and, for tokens ``arriving`` from a feed, the tokens seen)."""
        positions = chunk.positions.numpy()
        norms = _norms(chunk.acts) if token_filter.max_norm is not None else None
        reasons = token_filter.reasons(positions, chunk.token_ids.numpy(), norms, self.bos_token_id, self.special_ids.tolist())
        with self._count_lock:
            seen = self.left_out.seen
            self.left_out.add(reasons, positions)
            if not arriving:  # already counted as seen when the feed passed them on
                self.left_out.seen = seen
        keep = np.ones(len(positions), dtype=bool)
        for mask in reasons.values():
            keep &= ~mask
        return keep

    def _start_feeds(self) -> None:
        self._feeds = [_Feed(self, i, sources, self.positions[i]) for i, sources in enumerate(self.stream_sources)]
        for feed in self._feeds:
            feed.start()

    def close(self) -> None:
        """Stop the background threads (the texts they computed ahead are dropped)."""
        feeds, self._feeds = self._feeds, []
        for feed in feeds:
            feed.stop.set()
        for feed in feeds:
            feed.join(timeout=60)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Buffer contents and text positions after the last batch yielded (for torch.save)."""
        return {
            "kind": "stream",
            "step": self.step,
            "positions": list(self.positions),
            "ended": list(self.ended),
            "buffers": [buf.state() for buf in self._buffers],
            "normalization": self.normalization,
            "token_filter": to_dict(self.token_filter) if self.token_filter is not None else None,
            "settings": self._settings(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "stream":
            raise CrossdiffError("cannot resume: the checkpoint was trained from a cache, not a stream")
        if self._feeds:
            raise RuntimeError("load_state_dict must come before iteration starts")
        if state["settings"].get("rank", 0) != self.collect.rank:
            raise CrossdiffError(
                "cannot resume a streamed run on several ranks: checkpoints hold rank 0's stream only "
                "(train from a cache to resume multi-rank runs, or restart in a new folder)"
            )
        for key, value in self._settings().items():
            if state["settings"].get(key) != value:
                raise CrossdiffError(f"cannot resume the stream: {key} was {state['settings'].get(key)!r}, now {value!r}")
        self.step = int(state["step"])
        self.positions, self.ended = list(state["positions"]), list(state["ended"])
        self.normalization = state["normalization"]
        saved = state.get("token_filter")
        self.token_filter = from_dict(ReadFilters, saved) if saved is not None else None
        for buf, saved in zip(self._buffers, state["buffers"]):
            buf.load(saved)

    def _settings(self) -> dict[str, Any]:
        texts = to_dict(self.collect)
        texts["sources"] = [recorded(source) for source in self.collect.sources]
        for volatile in ("out", "device"):
            texts.pop(volatile)
        return {"texts": repr(texts), "rank": self.collect.rank, "batch_size": self.batch_size, "buffer_tokens": self.buffer_tokens,
                "seed": self.seed, "source_ratio": repr(self.source_ratio), "filters": repr(self.filters),
                "normalize": self.normalize}


class _Feed(threading.Thread):
    """Runs both models over one stream's texts, from a saved position, into a bounded queue."""

    def __init__(self, stream: PairedActivationStream, index: int, sources: list[int], position: dict[str, Any] | None):
        super().__init__(name=f"crossdiff-stream-{index}", daemon=True)
        self.stream, self.sources, self.position = stream, sources, position
        self.queue: queue.Queue = queue.Queue(maxsize=stream.prefetch)
        self.stop = threading.Event()
        self.threads = torch.get_num_threads()  # a new thread would start from the default

    def run(self) -> None:
        torch.set_num_threads(self.threads)  # same kernels, so the same bits, as `crossdiff collect`
        try:
            self._produce()
        except BaseException as err:  # handed to the trainer's thread, which raises it
            self._put(err)

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        stream = self.stream
        steps = paired_records(stream.pair, stream.extractor, stream.collect, stream.text_sources, order=self.sources,
                               position=self.position, lock=stream._lock)
        for step in steps:
            chunk = self._arrived(step.records) if step.records is not None else stream.empty
            if not self._put(("chunk", chunk, step.after)):
                return
        self._put((_END, None, None))

    def _arrived(self, records: CacheBatch) -> CacheBatch:
        """A document batch as the buffer stores it: in the storage dtype (rounded like the cache),
        on the CPU, without the tokens the norm-free parts of the filter leave out."""
        stream = self.stream
        chunk = records._replace(acts=records.acts.to(stream.storage_dtype).cpu())
        if stream._static_filter is None:
            return chunk
        return _select(chunk, torch.from_numpy(stream._keep(stream._static_filter, chunk, arriving=True)))


def _norms(acts: torch.Tensor) -> np.ndarray:
    """[n, 2] float32 norms, computed as the cache computes its stored ``norm`` field."""
    return torch.linalg.vector_norm(acts, dim=-1, dtype=torch.float64).float().numpy()


def _select(chunk: CacheBatch, keep: torch.Tensor) -> CacheBatch:
    return chunk if bool(keep.all()) else chunk.select(keep)


# ---------------------------------------------------------------------- training


def saved_data_state(out_dir: str | Path) -> dict[str, Any] | None:
    """The data position stored in the newest checkpoint of a training folder, if any."""
    folder, _ = newest_checkpoint(out_dir)  # the checkpoint the trainer will resume from
    return None if folder is None else load_tensors(folder / STATE_NAME).get("data")


def train_streaming(collect: Any, stream_config: StreamConfig, train_config: Any, out_dir: str | Path, *,
                    pair: Any = None, quiet: bool = False, resume: Any = "auto"):
    """Train one crosscoder from a stream (resuming from OUT/checkpoints); returns it."""
    data = train_config.data
    if data.epochs not in (None, 1):
        raise CrossdiffError("a stream is one pass over the texts: set data.epochs = 1 (or train from a cache)")
    # Under torchrun each rank streams its own documents (as collect would split them) and
    # trains on its part of every global batch.
    data_parallel = DataParallel.from_environment(resolve_device(train_config.device))
    batch_size = train_config.batch_size
    if data_parallel is not None:
        collect = dataclasses.replace(collect, rank=data_parallel.rank, world_size=data_parallel.world_size)
        part = rank_slice(batch_size, data_parallel.rank, data_parallel.world_size)
        batch_size = part.stop - part.start
    stream = PairedActivationStream(
        collect, batch_size, data_parallel=data_parallel, buffer_tokens=stream_config.buffer_tokens, source_ratio=data.source_ratio,
        seed=train_config.seed, normalize=data.normalize, prefetch_batches=stream_config.prefetch_batches, pair=pair,
        filters=data.token_filter(), quiet=quiet,
    )
    try:
        state = saved_data_state(out_dir) if resume is not False else None
        if state is not None:
            stream.load_state_dict(state)  # the normalisation of the run being resumed
        else:
            stream.prime()
        trainer = Trainer(train_config, stream.d_model, out_dir, model_names=stream.model_names, layer=collect.layer,
                          input_scale=stream.normalization, token_filter=stream.token_filter, quiet=quiet)
        return trainer.fit(stream, resume=resume)
    finally:
        stream.close()


def with_rank_from_environment(collect: Any) -> Any:
    """Under torchrun each rank collects its own texts (the documents collect would give it)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return dataclasses.replace(collect, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    return collect
