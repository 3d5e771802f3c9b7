"""The report's data files: the latent table and the examples as small JavaScript files.

Pages opened from ``file://`` cannot ``fetch()`` local files, but they can load scripts.
So every data file is a script that hands its payload to the page
(``CROSSDIFF.addTable(key, {...})``, ``CROSSDIFF.addExamples(key, chunk, {...})``):

* ``data/<key>/table.js``: the columns the table shows at first and the yes/no columns
  (binary, base 64), column descriptions, twins and steering samples; loaded with the page;
* ``data/<key>/more.js``: the other columns and a preview of each latent's top example;
  loaded right after the first rows are drawn (it is half the data of a large table);
* ``data/<key>/search.js``: the text around each latent's top examples, for the table's
  text search; loaded when the search box is first used;
* ``data/<key>/examples/<chunk>.js``: the examples of ``CHUNK`` consecutive latents with
  the token texts they use, and each latent's activation histogram per source; loaded when
  a latent's panel opens, so a report of 100k latents loads only what is looked at.
"""

from __future__ import annotations

import base64
import json
import math
import sqlite3
from contextlib import closing
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import pandas as pd

from crossdiff.report.figures import verdicts
from crossdiff.report.inputs import Analysis

CHUNK = 128
"""Latents per examples file."""
PREVIEW_BEFORE, PREVIEW_AFTER = 10, 3
"""Tokens around the max token in the table's preview of the top example."""
SEARCH_EXAMPLES, SEARCH_BEFORE, SEARCH_AFTER = 3, 8, 3
"""Top examples, and tokens around their max token, that the text search looks at."""


@dataclass
class ExampleDigest:
    """What the table needs from the examples: a preview and search text per latent."""

    preview: dict[int, list[str]] = field(default_factory=dict)
    """latent -> [text before, max token, text after] of its top example."""
    search: dict[int, str] = field(default_factory=dict)
    chunks: list[int] = field(default_factory=list)
    """Indices of the example files written (latent // CHUNK)."""
    sources: list[str] = field(default_factory=list)


def write_examples(analysis: Analysis, key: str, folder: Path) -> ExampleDigest:
    """Write the example chunks of one analysis into ``folder`` and digest them for the table."""
    digest = ExampleDigest()
    if analysis.examples is None:
        return digest
    folder.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(f"file:{analysis.examples}?mode=ro", uri=True)) as db:
        vocab = dict(db.execute("SELECT id, text FROM tokens"))
        meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        digest.sources = list(meta.get("sources") or [])
        has_histograms = "histogram_bins" in meta
        for chunk, rows in _chunks(db):
            latents = _chunk_payload(rows, vocab, digest)
            if has_histograms:
                latents["bins"] = meta["histogram_bins"]
                for latent, counts in db.execute("SELECT latent, counts FROM histograms WHERE latent BETWEEN ? AND ?",
                                                 (chunk * CHUNK, chunk * CHUNK + CHUNK - 1)):
                    if str(latent) in latents["latents"]:
                        latents["latents"][str(latent)]["hist"] = json.loads(counts)
            (folder / f"{chunk}.js").write_text(
                f"CROSSDIFF.addExamples({json.dumps(key)},{chunk},{_dumps(latents)});\n", encoding="utf-8")
            digest.chunks.append(chunk)
    return digest


def _chunks(db: sqlite3.Connection) -> Iterator[tuple[int, list[tuple]]]:
    """The examples table in latent order (the index's order), cut into chunks of CHUNK latents."""
    cursor = db.execute(
        "SELECT latent, kind, rank, activation, source, doc_id, position, token_index, token_ids, activations "
        "FROM examples ORDER BY latent, kind, rank"
    )
    current, rows = None, []
    for row in cursor:
        chunk = row[0] // CHUNK
        if chunk != current and rows:
            yield current, rows
            rows = []
        current = chunk
        rows.append(row)
    if rows:
        yield current, rows


ALPHABET = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_", dtype=np.uint8)
"""64 JSON-safe characters: token indices and activation levels are written in base 64."""
LEVELS = 63
"""Activations are stored as 0..63 = fraction of the latent's largest activation in the chunk."""
MISSING = ord(".")


class _PackedWindows(NamedTuple):
    starts: np.ndarray  # each row's first token in the chunk's flat token arrays
    lengths: np.ndarray  # each row's window length
    used_ids: np.ndarray  # the token ids the chunk uses, sorted (its vocabulary)
    local_ids: np.ndarray  # each token as an index into used_ids
    width: int  # base-64 characters per token index
    scale: np.ndarray  # per latent (in row order), the activation that level 63 stands for
    token_text: str  # every token's index, ``width`` characters each
    level_text: str  # every token's activation level, one character each


def _pack_windows(rows: list[tuple]) -> _PackedWindows:
    """Every window of a chunk packed at once (far faster than one json.loads per example)."""
    lengths = np.array([row[8].count(",") + 1 for row in rows])
    ids = np.fromstring(",".join(row[8][1:-1] for row in rows), sep=",", dtype=np.int64)
    acts = np.fromstring(",".join(row[9][1:-1] for row in rows).replace("null", "nan"), sep=",", dtype=np.float64)
    assert ids.size == acts.size == lengths.sum(), "examples.sqlite: token_ids and activations differ in length"
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    used, local = np.unique(ids, return_inverse=True)
    width = max(1, math.ceil(math.log(max(len(used), 2), 64)))

    latent_of_row = np.array([row[0] for row in rows])
    # The largest activation of each latent in this chunk scales its levels (a latent's rows are contiguous).
    first_row = np.flatnonzero(np.r_[True, latent_of_row[1:] != latent_of_row[:-1]])
    token_start = starts[first_row]
    peak = np.fmax.reduceat(np.nan_to_num(acts, nan=0.0), token_start)
    scale = np.where(peak > 0, peak, 1.0)
    scale_of_token = np.repeat(scale, np.diff(np.r_[token_start, acts.size]))
    levels = np.clip(np.rint(LEVELS * acts / scale_of_token), 0, LEVELS)
    level_chars = np.where(np.isnan(acts), MISSING, ALPHABET[np.nan_to_num(levels).astype(np.int64)]).astype(np.uint8)
    digits = np.stack([(local // 64 ** (width - 1 - d)) % 64 for d in range(width)], axis=1)
    return _PackedWindows(starts, lengths, used, local, width, scale, ALPHABET[digits].tobytes().decode("ascii"),
                          level_chars.tobytes().decode("ascii"))


def _chunk_payload(rows: list[tuple], vocab: dict[int, str], digest: ExampleDigest) -> dict[str, Any]:
    """One chunk: its own vocabulary (the token texts it uses) and, per latent, the examples.

    An example is ``[kind (0 top, 1 quantile), rank, activation, source index, doc, position,
    token index, tokens, levels]`` where ``tokens`` holds ``width`` base-64 characters per
    token (an index into the chunk's vocabulary) and ``levels`` one base-64 character per
    token (the activation as 0..63 of ``scale``, ``.`` where unknown). Packing the windows into
    strings keeps a 100k-latent report a fraction of the size of lists of numbers.
    """
    packed = _pack_windows(rows)
    starts, lengths, width = packed.starts, packed.lengths, packed.width
    texts = [vocab.get(t, f"<{t}>") for t in packed.used_ids.tolist()]

    latents: dict[str, Any] = {}
    sources = {name: j for j, name in enumerate(digest.sources)}
    by_latent: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_latent.setdefault(row[0], []).append(i)
    for (latent, indices), latent_scale in zip(by_latent.items(), packed.scale.tolist()):
        # Top examples (rank order) first, then quantile samples from the highest bin down.
        indices.sort(key=lambda i: (rows[i][1] != "top", rows[i][2] if rows[i][1] == "top" else -rows[i][2]))
        examples = []
        for i in indices:
            _, kind, rank, activation, source, doc, position, token_index, *_ = rows[i]
            if source not in sources:
                sources[source] = len(digest.sources)
                digest.sources.append(source)
            a, b = int(starts[i]), int(starts[i] + lengths[i])
            examples.append([0 if kind == "top" else 1, rank, _round(activation), sources[source], doc, position,
                             token_index, packed.token_text[a * width:b * width], packed.level_text[a:b]])
            if kind == "top" and rank < SEARCH_EXAMPLES:
                window = [texts[t] for t in packed.local_ids[a:b].tolist()]
                if rank == 0:
                    digest.preview[latent] = ["".join(window[max(0, token_index - PREVIEW_BEFORE):token_index]),
                                              window[token_index] if token_index < len(window) else "",
                                              "".join(window[token_index + 1:token_index + 1 + PREVIEW_AFTER])]
                text = "".join(window[max(0, token_index - SEARCH_BEFORE):token_index + 1 + SEARCH_AFTER])
                digest.search[latent] = (digest.search.get(latent, "") + "\u2002" + text).strip()
        latents[str(latent)] = {"scale": _round(latent_scale), "examples": examples}
    return {"vocab": texts, "width": width, "latents": latents}


NUMBER_GROUPS = (
    ("Decoder", ("dnorm", "tag", "norm_base", "norm_chat", "dec_cos", "enc_cos", "twin", "twin_cos")),
    ("Activity", ("n_active", "freq", "max_act", "dead", "freq__*", "max_act__*", "*__*")),
    ("Where it fires", ("template_share", "bos_share", "role_*")),
    ("Latent Scaling", ("verdict", "rank_sum", "nu_error", "nu_error_se", "nu_recon", "nu_recon_se", "scaling_tokens",
                        "chat_specific", "complete_shrinkage", "latent_decoupling", "beta_*")),
    ("Latent Scaling along the base decoder", ("base_dir_*",)),
)
"""How a latent's page groups its numbers (column names or fnmatch patterns, first match
wins); columns in no group (an autointerp explanation, a newer analysis's) go under "Other"."""
FINDING_FIELDS = ("rank", "concept", "score", "dnorm_z", "contrast", "group", "group_share", "lens")
"""What a latent's page shows from findings.json, for the latents it ranks."""


def number_groups(columns: list[str]) -> list[list[Any]]:
    """``[[title, [column, ...]], ...]`` for the latent page, every column but ``latent`` once."""
    placed: dict[str, list[str]] = {title: [] for title, _ in NUMBER_GROUPS}
    placed["Other"] = []
    for name in columns:
        if name == "latent":
            continue
        title = next((t for t, patterns in NUMBER_GROUPS if any(fnmatchcase(name, p) for p in patterns)), "Other")
        placed[title].append(name)
    order = {t: [p for p in patterns] for t, patterns in NUMBER_GROUPS}
    for title, names in placed.items():  # the listed order first, then the table's
        patterns = order.get(title, [])
        names.sort(key=lambda n: next((i for i, p in enumerate(patterns) if fnmatchcase(n, p)), len(patterns)))
    return [[title, names] for title, names in placed.items() if names]


def finding_payload(findings: dict[str, Any] | None) -> dict[str, Any] | None:
    """Per latent that findings.json ranks: its rank, concept, evidence and logit-lens tokens."""
    if not findings:
        return None
    return {"pool": findings.get("pool"), "ranked": len(findings.get("latents", [])),
            "latents": {str(e["latent"]): {k: _round(e.get(k)) if isinstance(e.get(k), float) else e.get(k)
                                           for k in FINDING_FIELDS} for e in findings.get("latents", [])}}


CORE_COLUMNS = ("latent", "tag", "verdict", "dnorm", "dec_cos", "freq", "max_act", "nu_error", "nu_error_se",
                "nu_recon", "nu_recon_se", "template_share", "twin")
"""Columns the table shows at first (those present); they and every yes/no column load with
the page, the other columns and the previews right after the first rows are drawn."""


def table_payload(analysis: Analysis, digest: ExampleDigest) -> tuple[dict[str, Any], dict[str, Any]]:
    """The latent table and everything a latent panel shows besides its examples, split in
    two: what the first view needs (``table.js``) and the rest (``more.js``)."""
    table = analysis.table
    descriptions = analysis.summary.get("columns") or {}
    columns: dict[str, Any] = {}
    for name in table.columns:
        columns[name] = {**encode_column(table[name]), "desc": describe(name, descriptions)}
    if "verdict" not in table.columns:
        columns["verdict"] = {**encode_column(verdicts(table).replace("", None).astype("category")),
                              "desc": "Latent Scaling's verdict on a chat-only latent (from the flags)"}
    shown = [name for name in CORE_COLUMNS if name in columns]
    first = {name: col for name, col in columns.items() if name in shown or col["type"] == "bool"}
    latent_ids = table["latent"].astype(int).tolist()
    payload: dict[str, Any] = {
        "name": analysis.name,
        "n": len(table),
        "order": list(columns),
        "shown": shown,
        "columns": first,
        "examples": {"chunk": CHUNK, "chunks": digest.chunks, "sources": digest.sources} if digest.chunks else None,
        "twins": None,
        "steering": None,
        "groups": number_groups(list(columns)),
        "findings": finding_payload(analysis.findings),
    }
    if analysis.twins is not None and len(analysis.twins):
        twins = analysis.twins
        payload["twins"] = {"chat": twins["chat_latent"].astype(int).tolist(),
                            "base": twins["base_latent"].astype(int).tolist(),
                            "cos": [_round(v) for v in twins["cosine"].astype(float)]}
    if analysis.steering is not None:
        keep = [c for c in ("latent", "factor", "model", "prompt", "unsteered", "steered") if c in analysis.steering]
        payload["steering"] = json.loads(analysis.steering[keep].to_json(orient="records"))
    more = {
        "columns": {name: col for name, col in columns.items() if name not in first},
        "preview": [digest.preview.get(i) for i in latent_ids] if digest.preview else None,
    }
    return payload, more


def search_payload(analysis: Analysis, digest: ExampleDigest) -> list[str]:
    """Per latent (table order), the lowercased text the table's search looks in."""
    return [digest.search.get(int(i), "").lower() for i in analysis.table["latent"]]


def encode_column(series: pd.Series) -> dict[str, Any]:
    """A column as the page reads it: ``type`` (bool, int, float, cat) and the values as
    little-endian binary in base 64 (``dtype`` u1, i2, i4, f4 or f8; missing = NaN), which a
    browser decodes far faster than a list of numbers; a ``cat`` column adds its ``labels``
    (codes, -1 = missing)."""
    if pd.api.types.is_bool_dtype(series):
        return {"type": "bool", **_binary(series.fillna(False).to_numpy(dtype=np.uint8), "u1")}
    if pd.api.types.is_integer_dtype(series):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        fits = np.isfinite(values).all() and (values.size == 0 or np.abs(values).max() < 2 ** 31)
        return {"type": "int", **(_binary(values.astype(np.int32), "i4") if fits else _binary(values, "f8"))}
    if pd.api.types.is_float_dtype(series):
        return {"type": "float", **_binary(series.to_numpy(dtype=np.float64, na_value=np.nan), "f4")}
    categories = series.astype("category")
    dtype = "i2" if len(categories.cat.categories) < 2 ** 15 else "i4"
    return {"type": "cat", "labels": [str(c) for c in categories.cat.categories],
            **_binary(categories.cat.codes.to_numpy(), dtype)}


def _binary(values: np.ndarray, dtype: str) -> dict[str, str]:
    return {"dtype": dtype, "b64": base64.b64encode(np.ascontiguousarray(values, dtype="<" + dtype).tobytes()).decode("ascii")}


def describe(column: str, descriptions: dict[str, str]) -> str:
    if column in descriptions:
        return descriptions[column]
    stat, sep, source = column.partition("__")
    if sep and f"{stat}__<source>" in descriptions:
        return descriptions[f"{stat}__<source>"].replace("one text source", f"the source {source!r}")
    return ""


def _round(value: float, digits: int = 4) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
