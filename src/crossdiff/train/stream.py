"""Training without a cache: both models run and the crosscoder trains in one process.

``PairedActivationStream`` is a drop-in for :class:`crossdiff.train.loader.ShuffledPairLoader`:
an iterable of :class:`crossdiff.cache.store.CacheBatch` with ``normalization``, ``state_dict``
and ``load_state_dict``, so :class:`crossdiff.train.trainer.Trainer` trains from it unchanged.

Where the batches come from:

* Texts are read exactly as ``crossdiff collect`` reads them (same sources, documents,
  truncation, token budgets, chat-template masks, rank split), through the same helpers.
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

from crossdiff.cache.store import STORAGE_DTYPES, CacheBatch, LeftOut, ReadFilters, norm_profile
from crossdiff.config import from_dict, to_dict
from crossdiff.train.config import StreamConfig  # noqa: F401 (re-exported)
from crossdiff.train.trainer import STATE_NAME, Trainer, newest_checkpoint
from crossdiff.errors import CrossdiffError
from crossdiff.files import load_tensors
from crossdiff.texts import recorded

RECORDS = ("token_ids", "doc_ids", "positions", "source_ids", "template")
_END = "end"


class _Buffer:
    """Preallocated rows of paired activations and their token records; removal fills holes
    with rows from the end, so a draw costs O(batch), not O(buffer)."""

    def __init__(self, capacity: int, d_model: int, dtype: torch.dtype):
        self.acts = torch.empty(capacity, 2, d_model, dtype=dtype)
        self.records = {name: torch.empty(capacity, dtype=torch.bool if name == "template" else torch.long) for name in RECORDS}
        self.size = 0

    def append(self, chunk: dict[str, torch.Tensor]) -> None:
        n = chunk["acts"].shape[0]
        if self.size + n > self.acts.shape[0]:
            raise RuntimeError("shuffle buffer overflow")  # capacity leaves room for one document batch
        self.acts[self.size : self.size + n] = chunk["acts"]
        for name in RECORDS:
            self.records[name][self.size : self.size + n] = chunk[name]
        self.size += n

    def take(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        n, k = self.size, len(rows)
        index = torch.from_numpy(rows)
        out = {"acts": self.acts[index].clone(), **{name: t[index].clone() for name, t in self.records.items()}}
        taken = np.zeros(n, dtype=bool)
        taken[rows] = True
        holes = torch.from_numpy(np.sort(rows[rows < n - k]))
        movers = torch.from_numpy(np.flatnonzero(~taken[n - k :]) + (n - k))
        for tensor in (self.acts, *self.records.values()):
            tensor[holes] = tensor[movers]
        self.size = n - k
        return out

    def keep(self, mask: torch.Tensor) -> None:
        """Keep only the rows where ``mask`` is True (order preserved)."""
        kept = int(mask.sum())
        self.acts[:kept] = self.acts[: self.size][mask]
        for tensor in self.records.values():
            tensor[:kept] = tensor[: self.size][mask]
        self.size = kept

    def state(self) -> dict[str, torch.Tensor]:
        return {"acts": self.acts[: self.size].clone(), **{name: t[: self.size].clone() for name, t in self.records.items()}}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.size = 0
        self.append(state)


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
        from crossdiff.collect.answers import answered_sources
        from crossdiff.collect.collector import _load_pair, _validate
        from crossdiff.models import ResidualExtractor

        _validate(collect)
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
        self.data_parallel = data_parallel  # ranks agree on one normalisation
        self.pair = pair if pair is not None else _load_pair(collect, quiet)
        self.text_sources = answered_sources(collect, self.pair, quiet=quiet)  # answers sources: answered first, then read as chat
        self.extractor = ResidualExtractor(self.pair, collect.layer)
        self.d_model = self.pair.d_model
        self.model_names = [self.pair.base_name, self.pair.chat_name]
        self.storage_dtype = STORAGE_DTYPES[collect.dtype][1]
        tokenizer = self.pair.tokenizer
        self.bos_token_id = tokenizer.bos_token_id
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

        names = [s.name for s in collect.sources]
        if self.source_ratio is None:  # one stream: every source, in recipe order, like the cache
            self.stream_sources, self.per_batch = [list(range(len(names)))], [batch_size]
        else:
            unknown = sorted(set(self.source_ratio) - set(names))
            if unknown:
                raise CrossdiffError(f"source_ratio names unknown source {unknown[0]!r}; the recipe has {names}")
            listed = [i for i, name in enumerate(names) if name in self.source_ratio]
            self.stream_sources = [[i] for i in listed]
            self.per_batch = _shares(batch_size, [self.source_ratio[names[i]] for i in listed])
            for i, count in zip(listed, self.per_batch):
                if count == 0:
                    raise CrossdiffError(f"batch_size {batch_size} leaves no token for source {names[i]!r}")
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

    def _batch(self, parts: list[dict[str, torch.Tensor]]) -> CacheBatch:
        acts = torch.cat([p["acts"] for p in parts]).float()
        if self.normalization != [1.0, 1.0]:
            acts = acts * torch.tensor(self.normalization).view(1, 2, 1)
        return CacheBatch(acts, *(torch.cat([p[name] for p in parts]) for name in RECORDS))

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
                    chunk = _select(chunk, self._keep(self.token_filter, chunk))
                buf.append(chunk)
                self.positions[i] = position
        if self.normalization is None:
            self._calibrate()

    def _calibrate(self) -> None:
        """The token filter (resolved on the first full buffer) and the normalisation of its kept tokens."""
        if sum(buf.size for buf in self._buffers) == 0:
            raise CrossdiffError("the texts gave no token to train on")
        if self.filters is not None:
            profile = norm_profile([{"norm": _norms(buf.acts[: buf.size]), "position": buf.records["positions"][: buf.size].numpy()}
                                    for buf in self._buffers])
            self.token_filter = self.filters.resolve(profile)
            for buf in self._buffers:
                rows = {"acts": buf.acts[: buf.size], **{name: t[: buf.size] for name, t in buf.records.items()}}
                buf.keep(torch.from_numpy(self._keep(self.token_filter, rows)))
        norms = torch.cat([torch.linalg.vector_norm(b.acts[: b.size], dim=-1, dtype=torch.float64) for b in self._buffers])
        if norms.shape[0] == 0:
            raise CrossdiffError("the token filter left no token of the first buffer to train on")
        sums = torch.cat([(norms * norms).sum(dim=0), torch.tensor([float(norms.shape[0])], dtype=torch.float64)])
        if self.data_parallel is not None:  # every rank's first buffer, so all ranks scale alike
            sums = self.data_parallel.sum_(sums.to(self.data_parallel.device)).cpu()
        mean_sq = (sums[:2] / sums[2]).tolist()
        self.normalization = [math.sqrt(self.d_model / m) for m in mean_sq] if self.normalize else [1.0, 1.0]

    def _keep(self, token_filter: ReadFilters, chunk: dict[str, torch.Tensor], *, arriving: bool = False) -> np.ndarray:
        """Which of a chunk's tokens ``token_filter`` keeps; counts the others in :attr:`left_out`
        (and, for tokens ``arriving`` from a feed, the tokens seen)."""
        positions = chunk["positions"].numpy()
        norms = _norms(chunk["acts"]) if token_filter.max_norm is not None else None
        reasons = token_filter.reasons(positions, chunk["token_ids"].numpy(), norms, self.bos_token_id, self.special_ids.tolist())
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
        from crossdiff.collect.collector import _batches, _fit_max_len, _rank_budget, _rank_documents
        from crossdiff.models import check_same_tokenization

        stream, config = self.stream, self.stream.collect
        max_len = _fit_max_len(config.max_len, stream.pair)  # as collect: capped at the models' positions
        first, next_doc, tokens = _start(self.sources, self.position)
        for source_index in self.sources[first:]:
            source = stream.text_sources[source_index]
            start_doc = next_doc if source_index == self.sources[first] else 0
            tokens = tokens if source_index == self.sources[first] else 0
            docs = _rank_documents(config, source, stream.pair.tokenizer, start_doc, max_len)
            last_doc = start_doc - 1
            for batch_index, batch in enumerate(_batches(docs, config.batch_size, _rank_budget(config, source.name), tokens)):
                if batch_index == 0:
                    check_same_tokenization(stream.pair, batch)
                chunk = self._forward(batch, source_index)
                tokens += sum(len(doc.input_ids) for doc in batch)
                last_doc = batch[-1].doc_id
                position = {"source": source_index, "next_doc": last_doc + 1, "source_tokens": tokens}
                if not self._put(("chunk", chunk, position)):
                    return
            done = {"source": source_index, "next_doc": last_doc + 1, "source_tokens": tokens, "done": True}
            if not self._put(("chunk", _empty(stream), done)):
                return
        self._put((_END, None, None))

    def _forward(self, batch: list, source_index: int) -> dict[str, torch.Tensor]:
        from crossdiff.models import pad_batch

        stream = self.stream
        tokenizer = stream.pair.tokenizer
        pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
        input_ids, attention_mask = pad_batch([doc.input_ids for doc in batch], pad_id)
        with stream._lock:
            base, chat = stream.extractor(input_ids, attention_mask)
        keep = attention_mask.bool()
        on_device = keep.to(base.device)
        chunk = {
            "acts": torch.stack([base[on_device], chat[on_device]], dim=1).to(stream.storage_dtype).cpu(),
            "token_ids": input_ids[keep].long(),
            "doc_ids": torch.tensor([doc.doc_id for doc in batch for _ in doc.input_ids], dtype=torch.long),
            "positions": torch.tensor([p for doc in batch for p in range(len(doc.input_ids))], dtype=torch.long),
            "source_ids": torch.full((int(keep.sum()),), source_index, dtype=torch.long),
            "template": torch.tensor([flag for doc in batch for flag in doc.template_mask], dtype=torch.bool),
        }
        if stream._static_filter is None:
            return chunk
        return _select(chunk, torch.from_numpy(stream._keep(stream._static_filter, chunk, arriving=True)))


def _start(sources: list[int], position: dict[str, Any] | None) -> tuple[int, int, int]:
    """(index into ``sources``, first document, tokens already used) from a saved position."""
    if position is None:
        return 0, 0, 0
    index = sources.index(position["source"])
    if position.get("done"):
        return index + 1, 0, 0
    return index, position["next_doc"], position["source_tokens"]


def _norms(acts: torch.Tensor) -> np.ndarray:
    """[n, 2] float32 norms, computed as the cache computes its stored ``norm`` field."""
    return torch.linalg.vector_norm(acts, dim=-1, dtype=torch.float64).float().numpy()


def _select(chunk: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    if bool(keep.all()):
        return chunk
    return {name: tensor[keep] for name, tensor in chunk.items()}


def _empty(stream: PairedActivationStream) -> dict[str, torch.Tensor]:
    chunk = {"acts": torch.empty(0, 2, stream.d_model, dtype=stream.storage_dtype)}
    chunk.update({name: torch.empty(0, dtype=torch.bool if name == "template" else torch.long) for name in RECORDS})
    return chunk


def _shares(batch_size: int, ratio: list[float]) -> list[int]:
    """Tokens per source in each batch: proportional to ``ratio``, largest remainders first,
    summing to ``batch_size`` (the cache loader's split)."""
    total = sum(ratio)
    if any(not (r > 0) for r in ratio):
        raise CrossdiffError(f"source_ratio shares must be positive, got {ratio}")
    exact = [batch_size * r / total for r in ratio]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(ratio)), key=lambda i: counts[i] - exact[i])[: batch_size - sum(counts)]:
        counts[i] += 1
    return counts


# ---------------------------------------------------------------------- training


def saved_data_state(out_dir: str | Path) -> dict[str, Any] | None:
    """The data position stored in the newest checkpoint of a training folder, if any."""
    folder, _ = newest_checkpoint(out_dir)  # the checkpoint the trainer will resume from
    return None if folder is None else load_tensors(folder / STATE_NAME).get("data")


def train_streaming(collect: Any, stream_config: StreamConfig, train_config: Any, out_dir: str | Path, *,
                    pair: Any = None, quiet: bool = False, resume: Any = "auto"):
    """Train one crosscoder from a stream (resuming from OUT/checkpoints); returns it."""
    from crossdiff.train.distributed import DataParallel, rank_slice
    from crossdiff.devices import resolve_device

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
