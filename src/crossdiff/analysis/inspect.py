"""`crossdiff inspect ANALYSIS_DIR`: browse an analysis in the terminal (or from Python).

An analysis folder (``crossdiff analyze --out``) holds the latent table and the examples
file. :class:`Analysis` opens both and answers the questions a researcher asks next:

* :meth:`Analysis.latents`   list, filter (any column, a pandas query, ranges) and sort latents;
* :meth:`Analysis.show`      a latent's row and its examples, active tokens highlighted;
* :meth:`Analysis.search`    examples whose text contains a string (or matches a regex);
* :meth:`Analysis.rank_by_token`  which latents fire on tokens matching a string or regex.

Everything reads the stored files only: no model, no cache. The token ranking therefore
sees the tokens in the stored example windows (each latent's top and quantile examples
with their contexts), which is where a latent that fires on a word shows it.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crossdiff.analysis.read import EXAMPLES, AnalysisOutput
from crossdiff.analysis.screen import summary_screen
from crossdiff.errors import CrossdiffError
from crossdiff.terminal import printable, quoted

CONTEXT = "context"
"""The listing's last column: each latent's top context (Analysis.with_context)."""
DEFAULT_COLUMNS = ("latent", "dnorm", "tag", "verdict", "nu_error", "nu_error_se", "nu_recon", "nu_recon_se",
                   "scaling_tokens", "freq", "template_share")


class Analysis:
    """An analysis folder: ``latents.parquet`` (+ ``examples.sqlite`` when examples were kept)."""

    def __init__(self, folder: str | Path):
        self.output = AnalysisOutput(folder)  # RUN/NAME/analysis, RUN/NAME or a bare analysis folder
        self.folder = self.output.folder
        self.table = self.output.table()  # autointerp's columns joined, when present
        self.examples_path = self.folder / EXAMPLES

    # ------------------------------------------------------------------ latents
    def latents(self, where: str | None = None, *, sort: str | None = "dnorm", descending: bool = True,
                limit: int | None = 20, columns: list[str] | None = None,
                ranges: dict[str, tuple[float | None, float | None]] | None = None,
                **equals: Any) -> pd.DataFrame:
        """Latents as a table. ``where`` is a pandas query (``"tag == 'chat-only' and nu_error < 0.2"``);
        ``ranges`` maps a column to (low, high) bounds, inclusive, None = open; keyword
        arguments select equal values (``verdict="chat-specific"``, ``tag="other"``)."""
        frame = self.table
        for name in [*(ranges or {}), *equals, *([sort] if sort else []), *(columns or [])]:
            self._check_column(name)
        if where:
            try:
                frame = frame.query(where)
            except Exception as err:  # pandas raises many types for a bad expression
                raise CrossdiffError(f"cannot filter with {where!r}: {err}") from None
        for name, value in equals.items():
            frame = frame[frame[name].astype(str) == str(value)] if frame[name].dtype == object or str(frame[name].dtype) == "category" else frame[frame[name] == value]
        for name, (low, high) in (ranges or {}).items():
            if low is not None:
                frame = frame[frame[name] >= low]
            if high is not None:
                frame = frame[frame[name] <= high]
        if sort:
            frame = frame.sort_values(sort, ascending=not descending, kind="stable", na_position="last")
        if columns:
            frame = frame[list(columns)]
        return frame.head(limit) if limit else frame

    def row(self, latent: int) -> pd.Series:
        if not 0 <= latent < len(self.table):
            raise CrossdiffError(f"no latent {latent}: the crosscoder has {len(self.table)} latents")
        return self.table.iloc[latent]

    # ------------------------------------------------------------------ examples
    def examples(self, latent: int, kind: str | None = None) -> list:
        self.row(latent)
        with self.output.example_store() as store:
            return store.examples(latent, kind)

    def context(self, latent: int) -> str | None:
        """The latent's top context: its max-activating example's window, quoted and escaped."""
        return self.output.top_context(latent)

    def with_context(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame`` (with a ``latent`` column) and a ``context`` column: each latent's top context
        (empty without examples)."""
        contexts = [self.context(int(latent)) or "" for latent in frame["latent"]]
        self.output.close()
        return frame.assign(**{CONTEXT: contexts})

    def show(self, latent: int, *, n: int = 5, kind: str | None = "top", color: bool = False,
             before: int | None = None, after: int | None = None) -> str:
        """A latent's key numbers and its first ``n`` examples of ``kind`` ("top", "quantile",
        None = both), every active token highlighted."""
        # deferred: imports torch, which search, --summary and a listing without the context column do without
        from crossdiff.analysis.examples import render_example

        row = self.row(latent)
        fields = [c for c in DEFAULT_COLUMNS if c in row.index and c != "latent"]
        lines = [f"latent {latent}: " + "  ".join(f"{c} {_fmt(row[c])}" for c in fields)]
        roles = {c[len("role_"):]: row[c] for c in row.index if c.startswith("role_") and row[c] == row[c] and row[c] > 0}
        if roles:
            lines.append("  roles: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(roles.items(), key=lambda kv: -kv[1])))
        for ex in self.examples(latent, kind)[:n]:
            label = f"{ex.kind} {ex.rank}" if ex.kind == "top" else f"bin {ex.rank}"
            text = render_example(ex, before=before, after=after, mark="active", color=color)
            lines.append(f"  [{label}] f~ {ex.activation:.3f}  {printable(ex.source)} doc {ex.doc_id} pos {ex.position}:  "
                         + (text if color else quoted(text)))
        return "\n".join(lines)

    def search(self, text: str, *, regex: bool = False, limit: int | None = 20) -> pd.DataFrame:
        """Examples whose window text contains ``text`` (or matches it as a regex): one row per
        example with the latent, the example's kind and rank, the activation on its own token
        and the window text, strongest first."""
        pattern = self._pattern(text, regex)
        with self._db() as db:
            vocab = dict(db.execute("SELECT id, text FROM tokens"))
            self._need_text(vocab)
            rows = []
            for latent, kind, rank, activation, ids in db.execute(
                    "SELECT latent, kind, rank, activation, token_ids FROM examples"):
                window = "".join(vocab.get(t, "") for t in json.loads(ids))
                if pattern.search(window):
                    rows.append((latent, kind, rank, activation, window))
        frame = pd.DataFrame(rows, columns=["latent", "kind", "rank", "activation", "text"])
        frame = frame.sort_values("activation", ascending=False, kind="stable")
        return frame.head(limit) if limit else frame

    def rank_by_token(self, text: str, *, regex: bool = False, limit: int | None = 20) -> pd.DataFrame:
        """Latents ranked by their activation on the tokens matching ``text`` (a substring, or a
        regex with ``regex=True``; a match may span several tokens, and every token it touches
        counts): mean f~ over the matching tokens of the latent's stored windows (``mean_act``),
        the largest (``max_act_on_match``), how many matching tokens were seen (``matches``) and
        on how many the latent was active (``active``). Each document token counts once per
        latent, however many of the latent's windows contain it."""
        from crossdiff.analysis.stats import ACTIVE_THRESHOLD  # deferred: imports torch, as above

        pattern = self._pattern(text, regex)
        totals: dict[int, list[float]] = {}
        counted: set[tuple[str, int, int, int]] = set()
        for latent, source, doc, start, tokens, activations in self._windows():
            for offset in _matching_tokens(tokens, pattern):
                key = (source, doc, start + offset, latent)
                value = activations[offset]
                if key in counted or value is None:
                    continue
                counted.add(key)
                entry = totals.setdefault(latent, [0.0, 0.0, 0, 0])
                entry[0] += value
                entry[1] = max(entry[1], value)
                entry[2] += 1
                entry[3] += value > ACTIVE_THRESHOLD
        columns = ["latent", "mean_act", "max_act_on_match", "matches", "active"]
        frame = pd.DataFrame([(latent, t[0] / t[2], t[1], t[2], t[3]) for latent, t in totals.items()], columns=columns)
        info = self.table.set_index("latent")[[c for c in ("dnorm", "verdict") if c in self.table]]
        frame = frame.join(info, on="latent").sort_values(["mean_act", "active"], ascending=False, kind="stable")
        return frame.head(limit) if limit else frame

    # ------------------------------------------------------------------ internals
    def _db(self):
        return closing(sqlite3.connect(self.output.require_examples()))

    @staticmethod
    def _need_text(vocab: dict[int, str]) -> None:
        if not vocab:
            raise CrossdiffError("the examples store no token text (no tokenizer at analysis time): rerun "
                                 "crossdiff analyze with --tokenizer")

    def _windows(self):
        """Every stored window: latent, source, document, window start, token texts, activations."""
        with self._db() as db:
            vocab = dict(db.execute("SELECT id, text FROM tokens"))
            self._need_text(vocab)
            for latent, source, doc, start, ids, acts in db.execute(
                    "SELECT latent, source, doc_id, window_start, token_ids, activations FROM examples"):
                yield latent, source, doc, start, [vocab.get(t, "") for t in json.loads(ids)], json.loads(acts)

    def _check_column(self, name: str) -> None:
        if name not in self.table.columns:
            raise CrossdiffError(f"no column {name!r}; columns: {', '.join(self.table.columns)}")

    @staticmethod
    def _pattern(text: str, regex: bool) -> re.Pattern:
        try:
            return re.compile(text if regex else re.escape(text))
        except re.error as err:
            raise CrossdiffError(f"bad regular expression {text!r}: {err}") from None


def _matching_tokens(tokens: list[str], pattern: re.Pattern) -> set[int]:
    """Indices of the tokens that overlap a match of ``pattern`` in the joined window text."""
    text = "".join(tokens)
    ends = np.cumsum([len(t) for t in tokens])  # token i covers [ends[i] - len, ends[i])
    starts = ends - np.array([len(t) for t in tokens], dtype=ends.dtype) if tokens else ends
    hit: set[int] = set()
    for match in pattern.finditer(text):
        lo, hi = match.span()
        if hi == lo:
            continue
        hit.update(np.nonzero((starts < hi) & (ends > lo))[0].tolist())
    return hit


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "nan" if value != value else f"{value:.3g}"
    return str(value)


# ----------------------------------------------------------------------------- CLI


def run(args: argparse.Namespace) -> int:
    if args.summary:
        print(summary_screen(args.analysis))
        return 0
    if args.findings:
        # deferred: these import torch, as above
        from crossdiff.analysis.concepts import format_findings
        from crossdiff.analysis.table import format_summary

        output = AnalysisOutput(args.analysis)
        found = output.findings()  # the run's findings stage (a [behaviour] table) writes it
        print(format_findings(found, output.name) if found is not None else format_summary(output.summary()))
        return 0
    analysis = Analysis(args.analysis)
    limit = args.limit if args.limit > 0 else None
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 100):
        if args.latent is not None:
            color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
            kind = None if args.kind == "all" else args.kind
            print(analysis.show(args.latent, n=args.limit, kind=kind, color=color))
        elif args.search is not None:
            print(_render(analysis.search(args.search, regex=args.regex, limit=limit)))
        elif args.token is not None:
            print(_render(analysis.with_context(analysis.rank_by_token(args.token, regex=args.regex, limit=limit))))
        else:
            equals = {k: v for k, v in (("tag", args.tag), ("verdict", args.verdict)) if v is not None}
            wanted = args.columns.split(",") if args.columns else [*(c for c in DEFAULT_COLUMNS if c in analysis.table), CONTEXT]
            columns = [c for c in wanted if c != CONTEXT]
            frame = analysis.latents(args.where, sort=args.sort, descending=not args.ascending, limit=limit,
                                     columns=[*(["latent"] if "latent" not in columns else []), *columns],
                                     ranges=dict(_parse_range(r) for r in args.range), **equals)
            if CONTEXT in wanted:
                frame = analysis.with_context(frame)
            print(_render(frame[[c for c in wanted if c in frame]]))
    return 0


def _render(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(nothing matches)"
    # Windows, tokens and explanations are the data's text: escaped, never obeyed by the terminal.
    text = frame.select_dtypes(include=["object", "string"]).columns
    frame = frame.assign(**{c: frame[c].map(lambda v: printable(v) if isinstance(v, str) else v) for c in text})
    # Windows and contexts read from the left, as text does (pandas right-aligns every column):
    # values and the header padded to the column's width.
    widths = {c: max(len(c), int(frame[c].map(lambda v: len(str(v))).max())) for c in ("text", CONTEXT) if c in frame}
    frame = frame.set_axis([c.ljust(widths[c]) if c in widths else c for c in frame.columns], axis=1)
    left = {c.ljust(w): (lambda w: lambda value: f"{str(value):<{w}}")(w) for c, w in widths.items()}
    return frame.to_string(index=False, formatters=left)


def _parse_range(spec: str) -> tuple[str, tuple[float | None, float | None]]:
    name, sep, bounds = spec.partition("=")
    low, colon, high = bounds.partition(":")
    try:
        if not sep or not colon:
            raise ValueError
        return name, (float(low) if low else None, float(high) if high else None)
    except ValueError:
        raise CrossdiffError(f"--range {spec!r}: expected COLUMN=LOW:HIGH, e.g. dnorm=0.7:0.9 or nu_error=:0.2") from None
