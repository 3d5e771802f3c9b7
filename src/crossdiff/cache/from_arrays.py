"""Activations you already have, as a crossdiff cache: train and analyse them like collected ones.

Arrays from your own hooks or another library's cache go into :func:`write_cache`, which
writes the same sealed, checksummed shards and manifest as ``crossdiff collect`` (through
crossdiff.cache.store.CacheWriter), statistics included, so the training loader normalises them
exactly as it would a collected cache (``normalize=True``: E||x||^2 = d_model per model).

    from crossdiff.cache.from_arrays import write_cache
    cache = write_cache("my-cache", acts, token_ids, doc_ids=doc_ids, positions=positions,
                        source_ids=source_ids, sources=["web", "chat"], template=template,
                        models=("my/base", "my/chat"), layer=12)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from crossdiff.cache.store import MANIFEST, CacheWriter, PairedCache
from crossdiff.errors import CrossdiffError

DEFAULT_DOC_LENGTH = 1024


def write_cache(
    path: str | Path,
    acts: Any,
    token_ids: Any,
    *,
    doc_ids: Any = None,
    positions: Any = None,
    source_ids: Any = None,
    sources: Sequence[str] = ("data",),
    template: Any = None,
    models: tuple[str, str] = ("base", "chat"),
    layer: int | None = None,
    dtype: str = "float32",
    shard_tokens: int = 2**20,
    bos_token_id: int | None = None,
    special_token_ids: Sequence[int] = (),
) -> PairedCache:
    """Write ``acts`` [n, 2, d] (base first; numpy or torch, any float dtype) with one token id
    per row into a new cache folder at ``path`` and return it opened.

    ``doc_ids``/``positions`` give each token's document and position in it (position 0 counts
    as BOS); without them the tokens are cut into documents of 1024 in order, with positions
    starting at 1 so that no token counts as BOS. ``source_ids`` index ``sources`` (default:
    one source); ``template`` flags chat-template tokens (default: none). Tokens keep their
    order within each source; a shard holds one source, so sources are stored one after the
    other. ``models`` names the two models (the analysis loads the chat tokenizer from the
    second name for example text).
    """
    path = Path(path)
    if (path / MANIFEST).exists():
        raise CrossdiffError(f"{path} already holds a cache; write into a new folder")
    acts_t = _activations(acts)
    sources = list(sources)
    columns = _columns(acts_t.shape[0], sources, token_ids=token_ids, doc_ids=doc_ids, positions=positions,
                       source_ids=source_ids, template=template)
    writer = CacheWriter(path, models=tuple(models), layer=layer, d_model=acts_t.shape[2], sources=sources,
                         dtype=dtype, shard_tokens=shard_tokens, config={"written_by": "crossdiff.from_arrays"},
                         bos_token_id=bos_token_id, special_token_ids=special_token_ids)
    try:
        for s in range(len(sources)):
            _write_source(writer, acts_t, columns, s, shard_tokens)
        writer.finish()
    finally:
        writer.close()
    return PairedCache(path)


def _activations(acts: Any) -> torch.Tensor:
    """``acts`` as a [tokens, 2, d_model] tensor of finite floats (or CrossdiffError)."""
    acts_t = torch.as_tensor(np.asarray(acts) if not isinstance(acts, torch.Tensor) else acts)
    if acts_t.dim() != 3 or acts_t.shape[1] != 2 or acts_t.shape[0] == 0:
        raise CrossdiffError(f"acts must be [tokens, 2, d_model] with at least one token, got {list(acts_t.shape)}")
    if not acts_t.is_floating_point() or not bool(torch.isfinite(acts_t).all()):
        raise CrossdiffError("acts must be finite floating-point values")
    return acts_t


def _columns(n: int, sources: list[str], *, token_ids: Any, doc_ids: Any, positions: Any, source_ids: Any,
             template: Any) -> dict[str, np.ndarray]:
    """One checked numpy column per token record, the defaults filled in."""
    index = np.arange(n)
    columns = {
        "token_ids": _column(token_ids, n, "token_ids"),
        "doc_ids": _column(doc_ids, n, "doc_ids") if doc_ids is not None else index // DEFAULT_DOC_LENGTH,
        "positions": _column(positions, n, "positions") if positions is not None else index % DEFAULT_DOC_LENGTH + 1,
        "source_ids": _column(source_ids, n, "source_ids") if source_ids is not None else np.zeros(n, np.int64),
        "template": _column(template, n, "template").astype(bool) if template is not None else np.zeros(n, bool),
    }
    if columns["source_ids"].min() < 0 or columns["source_ids"].max() >= len(sources):
        raise CrossdiffError(f"source_ids must index sources ({len(sources)} names: {sources})")
    if columns["positions"].min() < 0 or columns["doc_ids"].min() < 0:
        raise CrossdiffError("doc_ids and positions must be non-negative")
    return columns


def _write_source(writer: CacheWriter, acts: torch.Tensor, columns: dict[str, np.ndarray], source: int,
                  shard_tokens: int) -> None:
    """The tokens of one source, in order, in shards of their own (a shard holds one source)."""
    rows = np.nonzero(columns["source_ids"] == source)[0]
    for start in range(0, len(rows), shard_tokens):
        part = rows[start:start + shard_tokens]
        if writer.room < len(part):
            writer.seal()
        writer.append(acts[torch.from_numpy(part)], token_ids=columns["token_ids"][part],
                      doc_ids=columns["doc_ids"][part], positions=columns["positions"][part], source_id=source,
                      template=columns["template"][part])
    writer.seal()


def _column(values: Any, n: int, name: str) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.shape != (n,):
        raise CrossdiffError(f"{name} must have one value per token ({n}), got shape {list(array.shape)}")
    return array
