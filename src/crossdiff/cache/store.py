"""The paired activation cache: sharded .npy files described by one manifest.

A cache is a folder (layout and guarantees in docs/cache.md)::

    manifest.json              what the cache holds; lists only sealed shards
    shard-00000/acts.npy       [n, 2, d] activations, base = 0, chat = 1
    shard-00000/tokens.npy     [n] per-token record (TOKEN_DTYPE)

A shard becomes part of the cache only when it is *sealed*: its files are complete,
flushed to disk, and their checksums are in the manifest, which is replaced atomically.
Anything else in the folder is an interrupted shard that the next writer discards. So a
crash, a kill or a full disk never leaves a manifest that points at bad data, and a
deterministic producer (crossdiff.collect.collector) can resume from the last seal and write the
very same bytes an uninterrupted run would have written.

numpy has no bfloat16, so bf16 activations are stored as their raw uint16 bit patterns;
:class:`PairedCache` turns them back into torch tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import struct
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossdiff.cache.batch import CacheBatch, concat_batches  # noqa: F401 (re-exported)
from crossdiff.cache.filters import DEFAULT_MAX_NORM_RATIO, FIRST_POSITION, ReadFilters, recorded_filter  # noqa: F401 (re-exported)
from crossdiff.config import from_dict
from crossdiff.errors import CrossdiffError, first_line
from crossdiff.files import (
    fsync_dir,
    remove_stray_temporaries,
    sha256_mismatch,
    sha256_stream,
    write_error,
    write_json_atomic,
)

MANIFEST = "manifest.json"
FORMAT = "crossdiff-paired-cache"
VERSION = 1
ACTS_FILE = "acts.npy"
TOKENS_FILE = "tokens.npy"
MODELS = ("base", "chat")

# One record per stored token. `norm` is the L2 norm of each model's stored activation,
# kept so read-time norm filters never have to touch the (100x larger) activations.
TOKEN_DTYPE = np.dtype(
    [
        ("token_id", "<i4"),
        ("doc_id", "<i8"),
        ("position", "<i4"),
        ("source_id", "<i2"),
        ("template", "?"),
        ("norm", "<f4", (2,)),
    ]
)

# storage dtype name -> (numpy dtype on disk, torch dtype of the stored values)
STORAGE_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "bfloat16": (np.dtype("<u2"), torch.bfloat16),
    "float16": (np.dtype("<f2"), torch.float16),
    "float32": (np.dtype("<f4"), torch.float32),
}

_SHARD_NAME = re.compile(r"^shard-\d{5}$")


_REASON_WORDS = {"first_position": "first positions", "bos": "BOS tokens", "special": "special tokens", "norm": "above {ratio}x the median norm"}


class LeftOut:
    """Counts of the tokens a filter left out, by reason and by position; one summary line."""

    def __init__(self, token_filter: ReadFilters | None):
        self.filter = token_filter
        self.seen = 0
        self.by_reason: dict[str, int] = {}
        self.by_position: dict[int, int] = {}

    def add(self, reasons: dict[str, np.ndarray], positions: np.ndarray) -> None:
        self.seen += len(positions)
        for name, mask in reasons.items():
            count = int(mask.sum())
            if count:
                self.by_reason[name] = self.by_reason.get(name, 0) + count
                for position, n in zip(*np.unique(np.asarray(positions)[mask], return_counts=True)):
                    self.by_position[int(position)] = self.by_position.get(int(position), 0) + int(n)

    def merge(self, other: LeftOut) -> None:
        self.seen += other.seen
        for name, n in other.by_reason.items():
            self.by_reason[name] = self.by_reason.get(name, 0) + n
        for position, n in other.by_position.items():
            self.by_position[position] = self.by_position.get(position, 0) + n

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def to_dict(self) -> dict[str, Any]:
        top = sorted(self.by_position.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        return {"tokens_seen": self.seen, "left_out": self.total, "by_reason": dict(self.by_reason),
                "by_position": {str(p): n for p, n in top},
                "filter": dataclasses.asdict(self.filter) if self.filter is not None else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LeftOut:
        """Back from :meth:`to_dict` (a summary.json entry)."""
        out = cls(from_dict(ReadFilters, data["filter"], "filter") if data.get("filter") is not None else None)
        out.seen, out.by_reason = int(data["tokens_seen"]), dict(data["by_reason"])
        out.by_position = {int(p): n for p, n in data["by_position"].items()}
        return out

    def line(self) -> str:
        """E.g. "left out 1,234 of 60,000 tokens: 1,200 first positions, 34 above 10x the median norm"."""
        if self.filter is None:
            return f"left out no tokens of {self.seen:,} (no token filter)"
        if not self.total:
            return f"left out no tokens of {self.seen:,} (filter: {self.filter.describe()})"
        ratio = f"{self.filter.max_norm_ratio:g}" if self.filter.max_norm_ratio is not None else "?"
        parts = [f"{n:,} {_REASON_WORDS[name].format(ratio=ratio)}" for name, n in self.by_reason.items()]
        return f"left out {self.total:,} of {self.seen:,} tokens: " + ", ".join(parts)


def norm_profile(records: Sequence[Any], *, sample_tokens: int = 2**20,
                 ratio: float = DEFAULT_MAX_NORM_RATIO) -> dict[str, Any]:
    """Where a cache's large activations are, from its per-token records (never the activations):
    ``tokens.npy`` arrays, or anything with their ``norm`` [n, 2] float32 and ``position`` fields.

    ``median``: each model's median norm, from an evenly strided sample of up to
    ``sample_tokens`` tokens (deterministic); ``first_position_median``: over every position-0
    token; ``above_ratio``: tokens above ``ratio`` x the median in either model, with the
    count at position 0 and the positions that hold most of them. Stored in the manifest at
    collection, so filters and summaries need no pass over the records.
    """
    n_tokens = sum(len(r["position"]) for r in records)
    stride = max(1, -(-n_tokens // sample_tokens))
    sample, firsts, offset = [], [], 0
    for r in records:
        sample.append(np.array(r["norm"][(-offset) % stride :: stride]))
        firsts.append(np.array(r["norm"][np.asarray(r["position"]) == 0]))
        offset += len(r["position"])
    sample_all = np.concatenate(sample) if sample else np.zeros((0, 2), np.float32)
    median = np.median(sample_all.astype(np.float64), axis=0) if len(sample_all) else np.ones(2)
    first_all = np.concatenate(firsts) if firsts else np.zeros((0, 2), np.float32)
    limit = (ratio * median).astype(np.float32)
    above, above_first, positions = 0, 0, {}
    for r in records:
        mask = ~(np.asarray(r["norm"]) <= limit).all(axis=1)
        if mask.any():
            pos = np.asarray(r["position"])[mask]
            above += int(mask.sum())
            above_first += int((pos == 0).sum())
            for p, c in zip(*np.unique(pos, return_counts=True)):
                positions[int(p)] = positions.get(int(p), 0) + int(c)
    top = sorted(positions.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    return {
        "median": [float(v) for v in median],
        "first_position_median": [float(v) for v in np.median(first_all.astype(np.float64), axis=0)] if len(first_all) else None,
        "first_positions": int(len(first_all)),
        "ratio": float(ratio),
        "above_ratio": above,
        "above_ratio_first_position": above_first,
        "above_ratio_by_position": {str(p): c for p, c in top},
    }


def describe_profile(profile: dict[str, Any], n_tokens: int) -> str:
    """One line for collect's summary: how many massive tokens the cache holds, and where."""
    above, first = profile["above_ratio"], profile["above_ratio_first_position"]
    median = "/".join(f"{m:,.1f}" for m in profile["median"])
    if not above:
        return f"massive activations: none above {profile['ratio']:g}x the median norm ({median} base/chat)"
    where = ", ".join(f"position {p}: {c:,}" for p, c in list(profile["above_ratio_by_position"].items())[:3])
    return (f"massive activations: {above:,} of {n_tokens:,} tokens above {profile['ratio']:g}x the median norm "
            f"({median} base/chat), {first:,} of them first positions ({where}); training and analysis leave them out")


# ----------------------------------------------------------------------------- files


def _npy_header(dtype: np.dtype, shape: tuple[int, ...], size: int | None = None) -> bytes:
    """A .npy (version 1.0) header, padded to ``size`` bytes (default: the next multiple of 64).

    Writing it ourselves lets a shard reserve its header up front and later rewrite it
    with the final row count in exactly the same number of bytes.
    """
    descr = np.lib.format.dtype_to_descr(dtype)
    text = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (descr, tuple(shape))
    unpadded = 10 + len(text) + 1  # magic + version + length field, text, newline
    if size is None:
        size = -(-unpadded // 64) * 64
    if unpadded > size:
        raise ValueError("npy header does not fit")
    text += " " * (size - unpadded) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


class _AppendOnlyArray:
    """A .npy file grown by appending rows; the checksum is computed while writing.

    The header is written first for ``capacity`` rows and rewritten at :meth:`close`
    with the real count (same byte length), so an unfinished file never loads as a
    valid array. The sha256 covers the array payload; the header is checked separately
    by :func:`_check_npy`, being a pure function of dtype and shape.
    """

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...], capacity: int):
        self.path, self.dtype, self.row_shape = path, dtype, row_shape
        self.rows = 0
        self._hash = hashlib.sha256()
        self._header_size = len(_npy_header(dtype, (capacity, *row_shape)))
        self._file = open(path, "wb")
        self._file.write(_npy_header(dtype, (capacity, *row_shape)))

    def append(self, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        assert data.shape[1:] == self.row_shape, (data.shape, self.row_shape)
        self._file.write(memoryview(data).cast("B"))
        self._hash.update(memoryview(data).cast("B"))
        self.rows += len(data)

    def close(self) -> str:
        """Finalise the header, flush to disk; returns the payload's sha256."""
        self._file.seek(0)
        self._file.write(_npy_header(self.dtype, (self.rows, *self.row_shape), self._header_size))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._hash.hexdigest()

    def abandon(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass


def _check_npy(path: Path, dtype: np.dtype, shape: tuple[int, ...], sha256: str | None, name: str) -> None:
    """Raise CrossdiffError unless ``path`` is exactly the .npy the manifest describes."""
    if not path.is_file():
        raise CrossdiffError(f"{name} is missing")
    with open(path, "rb") as f:
        try:
            np.lib.format.read_magic(f)
            np.lib.format.read_array_header_1_0(f)
        except Exception:  # numpy parses the header as a Python literal: any failure means garbage
            raise CrossdiffError(f"{name} is corrupt (bad header)") from None
        header_size = f.tell()
        f.seek(0)
        if f.read(header_size) != _npy_header(dtype, shape, header_size):
            raise CrossdiffError(f"{name} is corrupt (bad header)")
        expected = header_size + int(np.prod(shape)) * dtype.itemsize
        actual = os.fstat(f.fileno()).st_size
        if actual != expected:
            raise CrossdiffError(f"{name} is corrupt (size {actual} bytes, expected {expected})")
        if sha256 is not None:
            if sha256_stream(f) != sha256:
                raise CrossdiffError(sha256_mismatch(name, MANIFEST))


# ----------------------------------------------------------------------------- stats


def _empty_stats(d_model: int) -> dict[str, np.ndarray | float | int]:
    return {"count": 0, "sum": np.zeros(d_model, np.float64), "sum_norm": 0.0, "sum_sq_norm": 0.0}


def _stats_to_json(stats: dict[str, dict]) -> dict[str, dict]:
    return {m: {**s, "sum": [float(v) for v in s["sum"]]} for m, s in stats.items()}


def _stats_from_json(data: dict[str, dict]) -> dict[str, dict]:
    return {m: {**s, "sum": np.asarray(s["sum"], np.float64)} for m, s in data.items()}


def _add_stats(total: dict[str, dict], part: dict[str, dict]) -> None:
    for m in MODELS:
        total[m]["count"] += part[m]["count"]
        total[m]["sum"] = total[m]["sum"] + part[m]["sum"]
        total[m]["sum_norm"] += part[m]["sum_norm"]
        total[m]["sum_sq_norm"] += part[m]["sum_sq_norm"]


# ----------------------------------------------------------------------------- writer


class CacheWriter:
    """Appends paired activations to a cache folder, one sealed shard at a time.

    Opening a folder that already holds a manifest resumes it: the header must match
    (same models, layer, config...), unsealed shard folders are deleted, and
    :attr:`resume` tells the producer where the last sealed shard left off.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        models: tuple[str, str],
        layer: int,
        d_model: int,
        sources: Sequence[str],
        dtype: str = "bfloat16",
        shard_tokens: int = 2**20,
        config: dict[str, Any] | None = None,
        bos_token_id: int | None = None,
        special_token_ids: Sequence[int] = (),
    ):
        if dtype not in STORAGE_DTYPES:
            raise CrossdiffError(f"storage dtype must be one of {list(STORAGE_DTYPES)}, got {dtype!r}")
        if shard_tokens < 1:
            raise CrossdiffError(f"shard_tokens must be positive, got {shard_tokens}")
        self.path = Path(path)
        self.d_model, self.shard_tokens, self.sources = d_model, shard_tokens, list(sources)
        self._np_dtype, self._torch_dtype = STORAGE_DTYPES[dtype]
        header = {
            "format": FORMAT,
            "version": VERSION,
            "models": list(models),
            "layer": layer,
            "d_model": d_model,
            "dtype": dtype,
            "sources": self.sources,
            "shard_tokens": shard_tokens,
            "bos_token_id": bos_token_id,
            "special_token_ids": sorted(set(int(i) for i in special_token_ids)),
            "config": config or {},
        }
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(self.path, err) from None
        manifest_path = self.path / MANIFEST
        remove_stray_temporaries(self.path, MANIFEST)  # left by a kill before the rename
        if manifest_path.exists():
            self.manifest = _read_manifest(manifest_path)
            check_same_settings(self.manifest, header, self.path)
            self._stats = _stats_from_json(self.manifest["stats"])
            # Resuming on top of a sealed shard that is gone or cut short would finish a
            # cache that lacks data; say so now (sizes only: cheap).
            check_shard_sizes(self.path, self.manifest)
        else:
            self.manifest = {**header, "complete": False, "n_tokens": 0, "shards": [], "stats": {}}
            self._stats = {m: _empty_stats(d_model) for m in MODELS}
        self._discard_unsealed_shards()
        # A rerun starts afresh from what stopped the last one (see stop); it stops again if it must.
        if not manifest_path.exists() or self.manifest.pop("stopped", None) is not None:
            self._write_manifest()
        self._files: tuple[_AppendOnlyArray, _AppendOnlyArray] | None = None
        self._shard_stats = {m: _empty_stats(d_model) for m in MODELS}
        self._shard_source: int | None = None

    # -- state a producer needs to resume
    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def n_tokens(self) -> int:
        """Tokens in sealed shards plus the open one."""
        return self.manifest["n_tokens"] + self.open_tokens

    @property
    def open_tokens(self) -> int:
        return self._files[0].rows if self._files else 0

    @property
    def room(self) -> int:
        """Tokens the open shard can still take."""
        return self.shard_tokens - self.open_tokens

    @property
    def resume(self) -> dict[str, Any] | None:
        """The ``resume`` record given when sealing the last shard (None for a fresh cache)."""
        shards = self.manifest["shards"]
        return shards[-1]["resume"] if shards else None

    @property
    def shard_names(self) -> list[str]:
        return [s["name"] for s in self.manifest["shards"]]

    # -- writing
    def append(
        self,
        acts: torch.Tensor,
        token_ids: Sequence[int] | np.ndarray | torch.Tensor,
        doc_ids: Sequence[int] | np.ndarray | torch.Tensor,
        positions: Sequence[int] | np.ndarray | torch.Tensor,
        source_id: int,
        template: Sequence[bool] | np.ndarray | torch.Tensor,
    ) -> None:
        """Add ``n`` tokens ([n, 2, d] activations, any float dtype, any device) to the open shard.

        A shard holds one source only and never more than ``shard_tokens`` tokens; the
        caller seals before either would be violated (see :attr:`room`).
        """
        if self.complete:
            raise RuntimeError("cache is already complete")
        n = acts.shape[0]
        if n == 0:  # nothing to store; opening a shard for it would tie that shard to this source
            return
        if acts.shape[1:] != (2, self.d_model):
            raise ValueError(f"expected activations [n, 2, {self.d_model}], got {list(acts.shape)}")
        if n > self.room:
            raise ValueError(f"{n} tokens do not fit in the open shard ({self.room} left)")
        if self._shard_source is not None and source_id != self._shard_source:
            raise ValueError("a shard holds one source; seal before switching sources")
        stored = acts.detach().to(self._torch_dtype)
        # Statistics of exactly what is stored, in float64, on the producer's device.
        norms = torch.linalg.vector_norm(stored, dim=-1, dtype=torch.float64)  # [n, 2]
        sums = stored.sum(0, dtype=torch.float64).cpu().numpy()
        norm_sums = norms.sum(0).tolist()
        sq_sums = (norms * norms).sum(0).tolist()
        for m, model in enumerate(MODELS):
            s = self._shard_stats[model]
            s["count"] += n
            s["sum"] = s["sum"] + sums[m]
            s["sum_norm"] += norm_sums[m]
            s["sum_sq_norm"] += sq_sums[m]

        records = np.empty(n, TOKEN_DTYPE)
        records["token_id"] = _as_numpy(token_ids)
        records["doc_id"] = _as_numpy(doc_ids)
        records["position"] = _as_numpy(positions)
        records["source_id"] = source_id
        records["template"] = _as_numpy(template)
        records["norm"] = norms.float().cpu().numpy()
        raw = stored.cpu().contiguous()
        if self._torch_dtype == torch.bfloat16:
            raw = raw.view(torch.int16)
        raw_np = raw.numpy().view(self._np_dtype)

        files = self._open_shard(source_id)
        try:
            files[0].append(raw_np)
            files[1].append(records)
        except OSError as err:
            raise write_error(files[0].path.parent, err) from None

    def seal(self, resume: dict[str, Any] | None = None) -> str | None:
        """Close the open shard and record it (with ``resume``) in the manifest.

        Returns the shard's name, or None when there was nothing to seal.
        """
        if not self._files or self._files[0].rows == 0:
            return None
        name = self._files[0].path.parent.name
        try:
            sha = {f.path.name: f.close() for f in self._files}
            fsync_dir(self._files[0].path.parent)
        except OSError as err:
            raise write_error(self._files[0].path.parent, err) from None
        n = self._files[0].rows
        self._files = None
        source = self.sources[self._shard_source]
        self._shard_source = None
        _add_stats(self._stats, self._shard_stats)
        self._shard_stats = {m: _empty_stats(self.d_model) for m in MODELS}
        self.manifest["shards"].append(
            {"name": name, "n_tokens": n, "source": source, "sha256": sha, "resume": resume or {}}
        )
        self.manifest["n_tokens"] += n
        self._write_manifest()
        return name

    def finish(self) -> None:
        """Mark the cache complete (seal any open shard first)."""
        if self.open_tokens:
            raise RuntimeError("seal the open shard before finishing")
        self.manifest["norms"] = norm_profile([np.load(self.path / s["name"] / TOKENS_FILE, mmap_mode="r")
                                               for s in self.manifest["shards"]])
        self.manifest["complete"] = True
        self._write_manifest()

    def stop(self, reason: str) -> None:
        """Record in the manifest why the producer gave up on this cache (a problem a plain
        rerun will not fix, such as an empty source), so that readers of the incomplete cache
        say so instead of advising to rerun the collect."""
        self.manifest["stopped"] = reason
        self._write_manifest()

    def close(self) -> None:
        """Drop the open shard without sealing it (it is discarded on the next open)."""
        if self._files:
            for f in self._files:
                f.abandon()
            self._files = None

    # -- internals
    def _open_shard(self, source_id: int) -> tuple[_AppendOnlyArray, _AppendOnlyArray]:
        if self._files is None:
            folder = self.path / f"shard-{len(self.manifest['shards']):05d}"
            try:
                folder.mkdir()
                self._files = (
                    _AppendOnlyArray(folder / ACTS_FILE, self._np_dtype, (2, self.d_model), self.shard_tokens),
                    _AppendOnlyArray(folder / TOKENS_FILE, TOKEN_DTYPE, (), self.shard_tokens),
                )
            except OSError as err:
                raise write_error(folder, err) from None
            self._shard_source = source_id
        return self._files

    def _discard_unsealed_shards(self) -> None:
        sealed = set(self.shard_names)
        for child in self.path.iterdir():
            if child.is_dir() and _SHARD_NAME.match(child.name) and child.name not in sealed:
                shutil.rmtree(child)

    def _write_manifest(self) -> None:
        self.manifest["stats"] = _stats_to_json(self._stats)
        self.manifest["tokens_per_source"] = _tokens_per_source(self.manifest)
        write_json_atomic(self.path / MANIFEST, self.manifest)



def _as_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _tokens_per_source(manifest: dict[str, Any]) -> dict[str, int]:
    counts = {s: 0 for s in manifest["sources"]}
    for shard in manifest["shards"]:
        counts[shard["source"]] += shard["n_tokens"]
    return counts


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CrossdiffError(f"cannot read {path}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CrossdiffError(f"{path} is not a crossdiff paired-activation cache manifest")
    if manifest.get("version") != VERSION:
        raise CrossdiffError(f"{path} has cache format version {manifest.get('version')}, this crossdiff reads {VERSION}")
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise CrossdiffError(f"{path} is damaged: it lacks the key(s) {', '.join(missing)}")
    if manifest["dtype"] not in STORAGE_DTYPES:
        raise CrossdiffError(f"{path} is damaged: unknown storage dtype {manifest['dtype']!r}")
    for shard in manifest["shards"]:
        if not isinstance(shard, dict) or any(k not in shard for k in ("name", "n_tokens", "sha256", "source")):
            raise CrossdiffError(f"{path} is damaged: a shard entry lacks name, n_tokens, sha256 or source")
    held = sum(shard["n_tokens"] for shard in manifest["shards"])
    if manifest["n_tokens"] != held:
        raise CrossdiffError(f"{path} is inconsistent: n_tokens is {manifest['n_tokens']} but its shards hold {held} (was it edited?)")
    return manifest


_MANIFEST_KEYS = ("models", "layer", "d_model", "dtype", "sources", "shard_tokens", "complete", "n_tokens", "shards", "stats")


def _row_shapes(manifest: dict[str, Any]) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    return {ACTS_FILE: (STORAGE_DTYPES[manifest["dtype"]][0], (2, manifest["d_model"])), TOKENS_FILE: (TOKEN_DTYPE, ())}


def check_shard_sizes(path: Path, manifest: dict[str, Any]) -> None:
    """CrossdiffError unless every shard file the manifest lists exists with the size it implies.

    A size that disagrees is blamed on the file when its own header disagrees too (a
    truncated or damaged file), and on the manifest when the file is self-consistent."""
    for shard in manifest["shards"]:
        n = shard["n_tokens"]
        for file, (dtype, row) in _row_shapes(manifest).items():
            name = f"{shard['name']}/{file}"
            target = path / shard["name"] / file
            try:
                size = target.stat().st_size
            except FileNotFoundError:
                raise CrossdiffError(f"{name} is missing (the cache at {path} is damaged; collect it again)") from None
            except OSError as err:
                raise CrossdiffError(f"cannot read {target}: {err.strerror}") from None
            payload = n * int(np.prod(row, dtype=np.int64)) * dtype.itemsize
            headers = {len(_npy_header(dtype, (n, *row))), len(_npy_header(dtype, (manifest["shard_tokens"], *row)))}
            if size - payload in headers:
                continue
            rows_in_file = _rows_in_file(target, dtype, row, size)
            if rows_in_file is not None:
                raise CrossdiffError(
                    f"{path / MANIFEST} is inconsistent: it says {shard['name']} holds {n} tokens, "
                    f"its files hold {rows_in_file} (was the manifest edited?)"
                )
            raise CrossdiffError(f"{name} is corrupt (size {size} bytes, expected {payload + min(headers)})")


def _rows_in_file(path: Path, dtype: np.dtype, row: tuple[int, ...], size: int) -> int | None:
    """Rows of a .npy file whose header matches ``dtype``/``row`` and its size; else None."""
    try:
        with open(path, "rb") as f:
            np.lib.format.read_magic(f)
            shape, _, file_dtype = np.lib.format.read_array_header_1_0(f)
            header = f.tell()
    except Exception:  # numpy parses the header as a Python literal: any failure means garbage
        return None
    if file_dtype != dtype or tuple(shape[1:]) != row:
        return None
    return shape[0] if header + shape[0] * int(np.prod(row, dtype=np.int64)) * dtype.itemsize == size else None


def check_same_settings(existing: dict[str, Any], header: dict[str, Any], path: Path) -> None:
    """CrossdiffError unless every key of ``header`` matches the existing manifest's."""
    for key, value in header.items():
        if existing.get(key) != value:
            if key == "config":
                what = "config differs in " + "; ".join(
                    f"{name}: {old!r} there, {new!r} now" for name, old, new in _differences(existing[key], value))
            else:
                what = f"{key} is {existing.get(key)!r} there, {value!r} now"
            raise CrossdiffError(f"{path} holds a cache collected with other settings ({what}); use a new output folder")


def _differences(old: Any, new: Any, name: str = "") -> list[tuple[str, Any, Any]]:
    """The leaves where two settings differ, named by path (``sources[1].column``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(old.keys() | new.keys(), key=str)
                for d in _differences(old.get(k), new.get(k), f"{name}.{k}" if name else str(k))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{name}[{i}]")]
    return [] if old == new else [(name, old, new)]


# ----------------------------------------------------------------------------- ranks


def rank_folder(out: str | Path, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` writes its part: ``out`` itself for one rank, ``out/rank-R`` otherwise."""
    return Path(out) if world_size == 1 else Path(out) / f"rank-{rank}"


def merge_ranks(out: str | Path, world_size: int) -> bool:
    """Write ``out/manifest.json`` joining the complete rank caches; False if a rank is unfinished.

    Each rank calls this after finishing its own part. The merged manifest is a pure
    function of the rank manifests, so ranks that finish together write identical bytes.
    """
    out = Path(out)
    parts = []
    for rank in range(world_size):
        path = rank_folder(out, rank, world_size) / MANIFEST
        if not path.exists():
            return False
        part = _read_manifest(path)
        if not part["complete"]:
            return False
        parts.append((rank, part))
    merged = {k: v for k, v in parts[0][1].items() if k not in ("shards", "stats", "n_tokens", "tokens_per_source", "norms")}
    merged["shards"] = [
        {**shard, "name": f"rank-{rank}/{shard['name']}"} for rank, part in parts for shard in part["shards"]
    ]
    merged["n_tokens"] = sum(part["n_tokens"] for _, part in parts)
    stats = {m: _empty_stats(merged["d_model"]) for m in MODELS}
    for _, part in parts:
        _add_stats(stats, _stats_from_json(part["stats"]))
    merged["stats"] = _stats_to_json(stats)
    merged["tokens_per_source"] = _tokens_per_source(merged)
    if all("norms" in part for _, part in parts):  # medians do not add up: recomputed over every rank's records
        merged["norms"] = norm_profile([np.load(out / s["name"] / TOKENS_FILE, mmap_mode="r") for s in merged["shards"]])
    write_json_atomic(out / MANIFEST, merged)
    return True


# ----------------------------------------------------------------------------- reader


class PairedCache:
    """Read access to a finished cache: manifest, statistics, shards as memory maps.

    Nothing damaged is ever read silently. Opening checks that every shard file exists
    with the size the manifest implies (a stat per file); each file's sha256 is then
    checked the first time this process reads it (``checksums=False`` skips that), and
    :meth:`verify_ahead` hashes shards about to be read in a background thread so that
    training rarely waits. ``verify=True`` checks every checksum at once.
    """

    def __init__(self, path: str | Path, verify: bool = False, allow_incomplete: bool = False, checksums: bool = True):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            if sorted(self.path.glob(f"rank-*/{MANIFEST}")):
                raise CrossdiffError(f"{self.path} holds rank parts but no merged manifest: some rank has not finished")
            raise CrossdiffError(f"no paired-activation cache at {self.path} ({MANIFEST} missing)")
        self.manifest = _read_manifest(manifest_path)
        if not self.manifest["complete"] and not allow_incomplete:
            if self.manifest.get("stopped"):
                raise CrossdiffError(
                    f"cache at {self.path} is incomplete: its collect stopped with \"{self.manifest['stopped']}\"; "
                    "fix that, then rerun the collect command"
                )
            raise CrossdiffError(
                f"cache at {self.path} is incomplete ({self.manifest['n_tokens']} tokens so far); "
                "rerun the same collect command to finish it"
            )
        self.n_tokens: int = self.manifest["n_tokens"]
        self.d_model: int = self.manifest["d_model"]
        self.layer: int = self.manifest["layer"]
        self.sources: list[str] = list(self.manifest["sources"])
        self.model_names: tuple[str, str] = tuple(self.manifest["models"])
        self.dtype: str = self.manifest["dtype"]
        self.shards: list[dict[str, Any]] = self.manifest["shards"]
        self.special_token_ids: list[int] = list(self.manifest.get("special_token_ids", []))
        self._np_dtype, self._torch_dtype = STORAGE_DTYPES[self.dtype]
        self._norm_profile: dict[str, Any] | None = None
        # A few recently used shard maps stay open: re-parsing .npy headers for every
        # batch costs more than the read itself, while a bounded number keeps the mapped
        # memory independent of the cache size.
        self._open: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        self.max_open_shards = 8
        for shard in self.shards:
            if ".." in Path(shard["name"]).parts or Path(shard["name"]).is_absolute():
                raise CrossdiffError(f"{manifest_path} names a shard outside the cache: {shard['name']}")
        check_shard_sizes(self.path, self.manifest)
        # (shard index, file) -> True once its checksum matched, or the Future of a background check.
        self.checksums = checksums
        self._verified: dict[tuple[int, str], bool | Future] = {}
        self._verify_lock = threading.Lock()
        self._verifier: ThreadPoolExecutor | None = None
        if verify:
            self.verify()

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return (
            f"PairedCache({str(self.path)!r}, {self.n_tokens} tokens, {len(self.shards)} shards, "
            f"layer {self.layer}, d_model {self.d_model}, {self.dtype})"
        )

    # -- checks
    def verify(self) -> None:
        """Check every shard file against the manifest (size, header, sha256)."""
        for shard in self.shards:
            self._check_shard(shard, with_checksum=True)
        self._verified.update({(i, f): True for i in range(len(self.shards)) for f in (ACTS_FILE, TOKENS_FILE)})

    def verify_ahead(self, shard_indices: Sequence[int]) -> None:
        """Start checking these shards' files in a background thread (hashlib releases the
        GIL), so that reading them later does not wait for the hash."""
        if not self.checksums:
            return
        with self._verify_lock:
            if self._verifier is None:
                self._verifier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crossdiff-verify")
            for i in shard_indices:
                for file in (TOKENS_FILE, ACTS_FILE):
                    if (i, file) not in self._verified:
                        self._verified[i, file] = self._verifier.submit(self._check_file, i, file)

    def _ensure_verified(self, shard_index: int, file: str) -> None:
        if not self.checksums:
            return
        with self._verify_lock:
            state = self._verified.get((shard_index, file))
        if state is True:
            return
        if state is None:
            self._check_file(shard_index, file)
        else:
            state.result()  # re-raises the background check's CrossdiffError here, in the reader
        with self._verify_lock:
            self._verified[shard_index, file] = True

    def _check_file(self, shard_index: int, file: str) -> None:
        shard = self.shards[shard_index]
        dtype, row = _row_shapes(self.manifest)[file]
        n = shard["n_tokens"]
        _check_npy(self.path / shard["name"] / file, dtype, (n, *row), shard["sha256"][file], f"{shard['name']}/{file}")

    def _check_shard(self, shard: dict[str, Any], with_checksum: bool) -> None:
        n = shard["n_tokens"]
        for file, dtype, shape in (
            (ACTS_FILE, self._np_dtype, (n, 2, self.d_model)),
            (TOKENS_FILE, TOKEN_DTYPE, (n,)),
        ):
            sha = shard["sha256"][file] if with_checksum else None
            _check_npy(self.path / shard["name"] / file, dtype, shape, sha, f"{shard['name']}/{file}")

    # -- statistics
    def stats(self) -> dict[str, dict[str, Any]]:
        """Per model ("base", "chat"): count, mean vector [d] (float64), mean_norm, mean_sq_norm."""
        out = {}
        for model, s in _stats_from_json(self.manifest["stats"]).items():
            count = max(s["count"], 1)
            out[model] = {
                "count": s["count"],
                "mean": s["sum"] / count,
                "mean_norm": s["sum_norm"] / count,
                "mean_sq_norm": s["sum_sq_norm"] / count,
            }
        return out

    def norm_profile(self) -> dict[str, Any]:
        """Median norms (overall and at position 0) and the massive tokens: :func:`norm_profile`.

        Recorded at collection; caches from before that are profiled from their records once.
        """
        if self._norm_profile is None:
            self._norm_profile = self.manifest.get("norms") or norm_profile([self.tokens(i) for i in range(len(self.shards))])
        return self._norm_profile

    def median_norms(self) -> np.ndarray:
        """Median activation norm per model [2], from an evenly strided sample of tokens."""
        return np.asarray(self.norm_profile()["median"], np.float64)

    # -- raw access
    def tokens(self, shard_index: int) -> np.ndarray:
        """Memory map of a shard's per-token records (TOKEN_DTYPE)."""
        return self._load(shard_index, TOKENS_FILE)

    def raw_acts(self, shard_index: int) -> np.ndarray:
        """Memory map of a shard's activations as stored ([n, 2, d]; uint16 bit patterns for bf16)."""
        return self._load(shard_index, ACTS_FILE)

    def _load(self, shard_index: int, file: str) -> np.ndarray:
        if (shard_index, file) in self._open:
            self._open.move_to_end((shard_index, file))
            return self._open[shard_index, file]
        array = self._map(shard_index, file)
        self._open[shard_index, file] = array
        while len(self._open) > 2 * self.max_open_shards:
            self._open.popitem(last=False)
        return array

    def _map(self, shard_index: int, file: str) -> np.ndarray:
        self._ensure_verified(shard_index, file)
        shard = self.shards[shard_index]
        name = f"{shard['name']}/{file}"
        try:
            array = np.load(self.path / shard["name"] / file, mmap_mode="r")
        except FileNotFoundError:
            raise CrossdiffError(f"{name} is missing") from None
        except Exception as err:  # any failure to parse the header means a damaged file
            raise CrossdiffError(f"{name} is corrupt ({first_line(err)})") from None
        if len(array) != shard["n_tokens"]:
            raise CrossdiffError(f"{name} is corrupt ({len(array)} rows, manifest says {shard['n_tokens']})")
        return array

    def read(
        self,
        shard_index: int,
        rows: slice | np.ndarray,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> CacheBatch:
        """Tokens ``rows`` (a slice or sorted index array) of one shard as a CacheBatch."""
        # Copies: a batch must not keep the shard's memory map (and its pages) alive.
        raw = np.array(self.raw_acts(shard_index)[rows])
        records = np.array(self.tokens(shard_index)[rows])
        return CacheBatch(
            acts=self.acts_to_torch(raw, device=device, dtype=dtype),
            token_ids=torch.from_numpy(records["token_id"].astype(np.int64)).to(device),
            doc_ids=torch.from_numpy(records["doc_id"].astype(np.int64)).to(device),
            positions=torch.from_numpy(records["position"].astype(np.int64)).to(device),
            source_ids=torch.from_numpy(records["source_id"].astype(np.int64)).to(device),
            template=torch.from_numpy(records["template"].copy()).to(device),
        )

    def acts_to_torch(
        self, raw: np.ndarray, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Stored activations (numpy, as on disk) -> torch tensor of ``dtype``."""
        tensor = torch.from_numpy(raw.view(np.int16) if self._torch_dtype == torch.bfloat16 else raw)
        if self._torch_dtype == torch.bfloat16:
            tensor = tensor.view(torch.bfloat16)
        # Convert on the target device: moving 2-byte values is half the traffic of float32.
        return tensor.to(device).to(dtype)

    # -- iteration
    def iter_batches(
        self,
        batch_size: int,
        *,
        filters: ReadFilters | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[CacheBatch]:
        """One pass over the cache in stored order (crossdiff.train.loader shuffles for training).

        Batches have ``batch_size`` tokens except possibly the last.
        """
        pending: list[CacheBatch] = []
        pending_n = 0
        for i, shard in enumerate(self.shards):
            self.verify_ahead([i + 1] if i + 1 < len(self.shards) else [])  # hash the next shard meanwhile
            keep = filters.keep_mask(np.asarray(self.tokens(i)), self) if filters else None
            for start in range(0, shard["n_tokens"], batch_size):
                rows: slice | np.ndarray = slice(start, min(start + batch_size, shard["n_tokens"]))
                if keep is not None:
                    rows = np.flatnonzero(keep[rows]) + start
                    if len(rows) == 0:
                        continue
                part = self.read(i, rows, device=device, dtype=dtype)
                pending.append(part)
                pending_n += len(part.acts)
                while pending_n >= batch_size:
                    batch = concat_batches(pending)
                    yield batch.select(slice(None, batch_size))
                    rest = batch.select(slice(batch_size, None))
                    pending, pending_n = ([rest], len(rest.acts)) if len(rest.acts) else ([], 0)
        if pending_n:
            yield concat_batches(pending)
