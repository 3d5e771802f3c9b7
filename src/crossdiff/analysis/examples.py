"""Max-activating and quantile examples for every latent, with their contexts.

Three streaming steps, each with memory bounded by (latents x examples):

1. :class:`TopActivations` keeps, per latent, the ``n_top`` tokens with the largest
   scaled activation (a running top-k over the token axis).
2. :class:`QuantileSamples` keeps, per latent and per activation bin (bins at fractions of
   the latent's max activation, known after step 1), ``per_bin`` tokens drawn uniformly:
   every active token gets a random key and the smallest keys of each bin survive, which
   is a uniform sample without replacement however the stream is batched. It also counts
   every active token per bin and source: the latent's activation histogram per source.
3. :class:`ContextCollector` re-reads the cache once and, for every kept example, records
   the tokens around it (``before`` tokens before, ``after`` after, same document) and the
   latent's activation on each of them. Tokens are found by their (source, document,
   position) key, so the cache needs no random access.

:func:`write_examples` stores the result in SQLite (one row per example, indexed by
latent); :class:`ExampleStore` reads it back.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from crossdiff.analysis.stats import ACTIVE_THRESHOLD
from crossdiff.errors import CrossdiffError
from crossdiff.terminal import printable

_POSITION_BITS = 20
_DOC_BITS = 30
_SOURCE_BITS = 63 - _POSITION_BITS - _DOC_BITS


def token_keys(source_ids: Tensor, doc_ids: Tensor, positions: Tensor) -> Tensor:
    """One int64 per token identifying (source, document, position)."""
    if positions.numel() and (int(positions.max()) >= 1 << _POSITION_BITS or int(doc_ids.max()) >= 1 << _DOC_BITS
                              or int(source_ids.max()) >= 1 << _SOURCE_BITS):
        raise CrossdiffError("document ids or positions are too large to index examples (doc < 2^30, position < 2^20)")
    return (source_ids.long() << (_DOC_BITS + _POSITION_BITS)) | (doc_ids.long() << _POSITION_BITS) | positions.long()


class ExampleRefs(NamedTuple):
    """A flat list of examples: which latent, where the token is, how strongly it fired."""

    latent: Tensor
    activation: Tensor
    source_id: Tensor
    doc_id: Tensor
    position: Tensor
    kind: Tensor
    """0 = top activation, 1 = quantile sample."""
    rank: Tensor
    """Rank among the latent's top examples (0 = max), or the quantile bin (0 = lowest)."""

    @staticmethod
    def concat(parts: list["ExampleRefs"]) -> "ExampleRefs":
        return ExampleRefs(*(torch.cat(column) for column in zip(*parts)))


class TopActivations:
    """Running per-latent top-``n_top`` of scaled activations over the token stream."""

    def __init__(self, n_latents: int, n_top: int, *, device: torch.device | str = "cpu"):
        self.n_top = n_top
        self.values = torch.full((n_latents, n_top), -torch.inf, dtype=torch.float64, device=device)
        self.refs = torch.zeros(3, n_latents, n_top, dtype=torch.int64, device=device)  # source, doc, position

    @torch.no_grad()
    def update(self, f_scaled: Tensor, source_ids: Tensor, doc_ids: Tensor, positions: Tensor) -> None:
        k = min(self.n_top, f_scaled.shape[0])
        values, rows = f_scaled.topk(k, dim=0)  # [k, D]: the batch's best tokens per latent
        values = values.to(torch.float64).masked_fill(values <= ACTIVE_THRESHOLD, -torch.inf)
        batch_refs = torch.stack([source_ids, doc_ids, positions]).long()[:, rows]  # [3, k, D]
        all_values = torch.cat([self.values, values.T], dim=1)
        all_refs = torch.cat([self.refs, batch_refs.transpose(1, 2)], dim=2)
        self.values, keep = all_values.topk(self.n_top, dim=1)
        self.refs = all_refs.gather(2, keep.expand(3, -1, -1))

    def max_act(self) -> Tensor:
        return self.values[:, 0].clamp_min(0)

    def examples(self) -> ExampleRefs:
        latent, rank = torch.nonzero(self.values > -torch.inf, as_tuple=True)
        source, doc, position = self.refs[:, latent, rank]
        return ExampleRefs(latent, self.values[latent, rank], source, doc, position,
                           torch.zeros_like(latent), rank)


class QuantileSamples:
    """Uniform samples of each latent's activations within bins at fractions of its max, and
    the count of active tokens in each bin per source (:meth:`histograms`)."""

    def __init__(self, max_act: Tensor, n_bins: int, per_bin: int, *, seed: int = 0, n_sources: int = 1):
        self.max_act = max_act.to(torch.float64)
        self.n_bins, self.per_bin, self.n_sources = n_bins, per_bin, n_sources
        device = max_act.device
        self.counts = torch.zeros(len(max_act) * n_bins * n_sources, dtype=torch.int64, device=device)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.worst_key = torch.full((len(max_act) * n_bins,), torch.inf, dtype=torch.float64, device=device)
        # Kept entries: group (latent * n_bins + bin), random key, activation, source, doc, position.
        self.kept = [torch.empty(0, dtype=dtype, device=device) for dtype in
                     (torch.int64, torch.float64, torch.float64, torch.int64, torch.int64, torch.int64)]

    @torch.no_grad()
    def update(self, f_scaled: Tensor, source_ids: Tensor, doc_ids: Tensor, positions: Tensor) -> None:
        rows, latents = torch.nonzero(f_scaled > ACTIVE_THRESHOLD, as_tuple=True)
        if rows.numel() == 0:
            return
        values = f_scaled[rows, latents].to(torch.float64)
        fraction = values / self.max_act[latents].clamp_min(1e-30)
        groups = latents * self.n_bins + (fraction * self.n_bins).long().clamp(0, self.n_bins - 1)
        sources = source_ids[rows].long().clamp(0, self.n_sources - 1)
        self.counts += torch.bincount(groups * self.n_sources + sources, minlength=self.counts.numel())
        keys = torch.rand(rows.numel(), generator=self.generator, device=rows.device, dtype=torch.float64)
        # A token can only enter a full group with a key below the group's largest kept key.
        chance = keys < self.worst_key[groups]
        rows, groups, keys, values = rows[chance], groups[chance], keys[chance], values[chance]
        new = [groups, keys, values, source_ids[rows].long(), doc_ids[rows].long(), positions[rows].long()]
        merged = [torch.cat([old, fresh]) for old, fresh in zip(self.kept, new)]
        keep = best_per_group(merged[0], -merged[1], self.per_bin)
        self.kept = [column[keep] for column in merged]
        group, key = self.kept[0], self.kept[1]
        full = torch.bincount(group, minlength=self.worst_key.numel()) >= self.per_bin
        largest = torch.zeros_like(self.worst_key).scatter_reduce(0, group, key, "amax")
        self.worst_key = torch.where(full, largest, torch.inf)

    def histograms(self) -> np.ndarray:
        """Active tokens per latent, source and bin: [latents, sources, bins]; bin b holds
        activations in [b, b + 1) / bins of the latent's max (the last one includes the max)."""
        counts = self.counts.view(-1, self.n_bins, self.n_sources).transpose(1, 2)
        return counts.cpu().numpy()

    def examples(self) -> ExampleRefs:
        group, _, values, source, doc, position = self.kept
        latent, bins = group // self.n_bins, group % self.n_bins
        return ExampleRefs(latent, values, source, doc, position, torch.ones_like(latent), bins)


def best_per_group(group: Tensor, score: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest-scoring entries of every group (fully vectorised)."""
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    sorted_groups = group[order]
    index = torch.arange(order.numel(), device=group.device)
    starts = torch.ones_like(sorted_groups, dtype=torch.bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    first_of_group = torch.where(starts, index, 0).cummax(dim=0).values
    return order[(index - first_of_group) < k]


class ContextCollector:
    """Collects, in one pass over the cache, each example's window of tokens and the
    latent's scaled activation on every token of the window."""

    def __init__(self, examples: ExampleRefs, *, before: int, after: int):
        self.examples = examples
        self.before, self.after = before, after
        width = before + 1 + after
        offsets = torch.arange(-before, after + 1, device=examples.position.device)
        positions = examples.position[:, None] + offsets  # [E, W]
        keys = token_keys(examples.source_id[:, None].expand_as(positions), examples.doc_id[:, None].expand_as(positions),
                          positions.clamp_min(0))
        keys = torch.where(positions >= 0, keys, -1).reshape(-1)  # -1 matches no token
        self.sorted_keys, self.order = torch.sort(keys)
        self.token_ids = torch.full((len(examples.latent), width), -1, dtype=torch.int32, device=keys.device)
        self.activations = torch.full((len(examples.latent), width), torch.nan, dtype=torch.float32, device=keys.device)
        self.width = width

    @torch.no_grad()
    def update(self, keys: Tensor, token_ids: Tensor, encode_rows: Callable[[Tensor], Tensor]) -> None:
        """``keys`` of the batch's tokens; ``encode_rows(rows)`` returns f~ [len(rows), D]."""
        lo = torch.searchsorted(self.sorted_keys, keys, side="left")
        hi = torch.searchsorted(self.sorted_keys, keys, side="right")
        counts = hi - lo
        rows = torch.nonzero(counts > 0, as_tuple=True)[0]
        if rows.numel() == 0:
            return
        f_scaled = encode_rows(rows)
        counts, lo = counts[rows], lo[rows]
        # Expand each matched row into the window slots that asked for it.
        row_of_slot = torch.repeat_interleave(torch.arange(rows.numel(), device=keys.device), counts)
        first_slot = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        within = torch.arange(row_of_slot.numel(), device=keys.device) - first_slot
        slots = self.order[lo[row_of_slot] + within]
        example, offset = slots // self.width, slots % self.width
        self.token_ids[example, offset] = token_ids[rows][row_of_slot].int()
        latent = self.examples.latent[example]
        self.activations[example, offset] = f_scaled[row_of_slot, latent].float()


def write_examples(
    path: str | Path,
    collector: ContextCollector,
    sources: list[str],
    *,
    token_text: Callable[[list[int]], list[str]] | None = None,
    metadata: dict[str, Any] | None = None,
    histograms: np.ndarray | None = None,
) -> Path:
    """Store every example with its context window in a SQLite file (replaced if present).

    Tables: ``examples`` (one row per example; ``token_ids`` and ``activations`` are JSON
    arrays over the window, ``token_index`` marks the example's own token), ``tokens``
    (id -> text, empty when no tokenizer was available), ``meta`` (key -> JSON value) and,
    given ``histograms`` ([latents, sources, bins], :meth:`QuantileSamples.histograms`),
    ``histograms`` (latent -> JSON counts per source, in ``sources`` order; latents that
    never fired left out; meta ``histogram_bins``).
    """
    path = Path(path)
    path.unlink(missing_ok=True)
    rows = _example_rows(collector, sources)
    token_ids = collector.token_ids.cpu().numpy()
    used_ids = sorted({int(t) for t in np.unique(token_ids) if t >= 0})
    texts = token_text(used_ids) if token_text is not None else []
    with closing(sqlite3.connect(path)) as db, db:  # commit, then close
        db.executescript(
            """
            CREATE TABLE examples (
                latent INTEGER, kind TEXT, rank INTEGER, activation REAL,
                source TEXT, doc_id INTEGER, position INTEGER,
                window_start INTEGER, token_index INTEGER, token_ids TEXT, activations TEXT);
            CREATE TABLE tokens (id INTEGER PRIMARY KEY, text TEXT);
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
            """
        )
        db.executemany("INSERT INTO examples VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        db.executemany("INSERT INTO tokens VALUES (?,?)", list(zip(used_ids, texts)))
        meta = {"window_before": collector.before, "window_after": collector.after, "sources": sources,
                **(metadata or {})}
        if histograms is not None:
            db.execute("CREATE TABLE histograms (latent INTEGER PRIMARY KEY, counts TEXT)")
            fired = np.flatnonzero(histograms.sum(axis=(1, 2)))
            db.executemany("INSERT INTO histograms VALUES (?,?)",
                           [(int(j), json.dumps(histograms[j].tolist(), separators=(",", ":"))) for j in fired])
            meta["histogram_bins"] = int(histograms.shape[2])
        db.executemany("INSERT INTO meta VALUES (?,?)", [(k, json.dumps(v)) for k, v in meta.items()])
        db.execute("CREATE INDEX examples_by_latent ON examples (latent, kind, rank)")
    return path


def _example_rows(collector: ContextCollector, sources: list[str]) -> list[tuple]:
    """One ``examples`` row per kept example, its window cut to the tokens that exist."""
    columns = [t.cpu().numpy() for t in collector.examples]
    token_ids = collector.token_ids.cpu().numpy()
    activations = collector.activations.cpu().numpy()
    rows = []
    for i in range(len(columns[0])):
        latent, activation, source, doc, position, kind, rank = (c[i] for c in columns)
        present = np.nonzero(token_ids[i] >= 0)[0]
        first, last = (present[0], present[-1]) if present.size else (collector.before, collector.before)
        rows.append((
            int(latent), "top" if kind == 0 else "quantile", int(rank), float(activation),
            sources[int(source)] if int(source) < len(sources) else str(int(source)), int(doc), int(position),
            int(position) - collector.before + int(first), collector.before - int(first),
            json.dumps(token_ids[i, first:last + 1].tolist()),
            json.dumps([None if a != a else a for a in np.round(activations[i, first:last + 1], 6).tolist()]),
        ))
    return rows


class Example(NamedTuple):
    latent: int
    kind: str
    """"top" or "quantile"."""
    rank: int
    """Rank among the top examples (0 = max), or the quantile bin (0 = lowest)."""
    activation: float
    source: str
    doc_id: int
    position: int
    window_start: int
    """Document position of the first token of the window."""
    token_index: int
    """Index of the example's own token within the window."""
    token_ids: list[int]
    activations: list[float | None]
    """Scaled activation of the latent on each token of the window."""
    tokens: list[str] | None
    """Token texts, when the file has them."""


class ExampleStore:
    """Read access to an examples file written by :func:`write_examples`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CrossdiffError(f"examples file not found: {self.path}")
        self.db = sqlite3.connect(self.path)
        self.meta = {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}
        self.vocab = dict(self.db.execute("SELECT id, text FROM tokens"))

    def examples(self, latent: int, kind: str | None = None) -> list[Example]:
        query = "SELECT * FROM examples WHERE latent = ?" + (" AND kind = ?" if kind else "") + " ORDER BY kind DESC, rank, activation DESC"
        params = (latent, kind) if kind else (latent,)
        out = []
        for row in self.db.execute(query, params):
            ids = json.loads(row[9])
            tokens = [self.vocab.get(t, "") for t in ids] if self.vocab else None
            out.append(Example(*row[:9], ids, json.loads(row[10]), tokens))
        return out

    def histogram(self, latent: int) -> np.ndarray | None:
        """Active tokens per source (``meta["sources"]`` order) and bin of the latent's max
        activation, [sources, bins]; zeros for a latent that never fired; None when the file
        has no histograms (written without quantile samples, or by an older analysis)."""
        if "histogram_bins" not in self.meta:
            return None
        row = self.db.execute("SELECT counts FROM histograms WHERE latent = ?", (latent,)).fetchone()
        if row is None:
            return np.zeros((len(self.meta["sources"]), self.meta["histogram_bins"]), dtype=np.int64)
        return np.array(json.loads(row[0]), dtype=np.int64)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "ExampleStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_ANSI_LEVELS = ("\x1b[43m", "\x1b[41m", "\x1b[45;1m")  # yellow, red, bold magenta background: weak -> strong
_ANSI_RESET = "\x1b[0m"


def render_example(example: Example, *, before: int | None = None, after: int | None = None,
                   mark: str = "max", color: bool = False) -> str:
    """An example's window as text, with ``before``/``after`` tokens around its own token.

    ``mark="max"`` highlights the example's own token; ``mark="active"`` every token where
    the latent is active (f~ > 1e-3). Highlight: [brackets], or ANSI background colours
    (stronger activation, stronger colour) when ``color`` is true. Tokens without stored
    text show as ``<id>``; the tokens' own control characters are escaped (terminal.printable).
    """
    texts = example.tokens or [f"<{t}>" for t in example.token_ids]
    if example.tokens is not None:
        texts = [text if text or not tid >= 0 else f"<{tid}>" for text, tid in zip(texts, example.token_ids)]
    first = 0 if before is None else max(0, example.token_index - before)
    last = len(texts) if after is None else min(len(texts), example.token_index + after + 1)
    peak = max((a for a in example.activations if a is not None), default=0.0) or 1.0
    pieces = []
    for i in range(first, last):
        activation = example.activations[i] if i < len(example.activations) else None
        marked = i == example.token_index if mark == "max" else (activation is not None and activation > ACTIVE_THRESHOLD)
        text = printable(texts[i])  # the data's own escapes must not reach the terminal
        if marked and color:
            level = min(len(_ANSI_LEVELS) - 1, int(len(_ANSI_LEVELS) * (activation or 0.0) / peak))
            text = f"{_ANSI_LEVELS[level]}{text}{_ANSI_RESET}"
        elif marked:
            text = f"[{text}]"
        pieces.append(text)
    return "".join(pieces)
