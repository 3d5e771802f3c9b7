"""`build_report`: a run's analyses -> a folder of static files that opens from disk."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

from crossdiff.causal.behaviour import read_behaviour
from crossdiff.errors import CrossdiffError
from crossdiff.files import begin_staging, commit_staging
from crossdiff.locks import output_lock
from crossdiff.report.adl import adl_section
from crossdiff.report.bundle import search_payload, table_payload, write_examples
from crossdiff.report.figures import FigureFile, write_figures
from crossdiff.report.inputs import Analysis, find_analyses
from crossdiff.report.page import render_index

ASSETS = ("app.js", "style.css")


def build_report(path: str | Path, out: str | Path | None = None, *, figures_only: bool = False,
                 say=print) -> Path:
    """Write the report (or, with ``figures_only``, just ``figures/<crosscoder>/*.png|svg``) for
    every analysis under ``path``; returns the report's index.html (or the figures folder).

    ``out`` defaults to ``<run>/report``. A previous report there is replaced whole (built
    beside it first, so an interrupted build leaves the old one intact); one build at a time
    per folder (its lock).
    """
    analyses = find_analyses(path)
    out = Path(out) if out is not None else default_out(Path(path))
    for analysis in analyses:
        for note in analysis.notes:
            say(f"crossdiff report: {analysis.name}: {note}")
    keys = _keys([a.name for a in analyses])
    if figures_only:
        for key, analysis in zip(keys, analyses):
            files = write_figures(analysis.table, analysis.summary, out / key, analysis.kl, analysis.findings)
            say(f"{analysis.name}: {', '.join(f.png.name for f in files)} (+ .svg) in {out / key}")
        return out
    _check_replaceable(out)
    with output_lock(out, "report"):
        partial = begin_staging(out)
        entries: list[tuple[str, Analysis, list[FigureFile]]] = []
        for key, analysis in zip(keys, analyses):
            figures = write_figures(analysis.table, analysis.summary, partial / "figures" / key, analysis.kl,
                                    analysis.findings)
            data = partial / "data" / key
            digest = write_examples(analysis, key, data / "examples")
            data.mkdir(parents=True, exist_ok=True)
            first, more = table_payload(analysis, digest)
            (data / "table.js").write_text(f"CROSSDIFF.addTable({json.dumps(key)},{_dumps(first)});\n", encoding="utf-8")
            (data / "more.js").write_text(f"CROSSDIFF.addMore({json.dumps(key)},{_dumps(more)});\n", encoding="utf-8")
            (data / "search.js").write_text(
                f"CROSSDIFF.addSearch({json.dumps(key)},{_dumps(search_payload(analysis, digest))});\n", encoding="utf-8")
            entries.append((key, analysis, figures))
        (partial / "assets").mkdir()
        for name in ASSETS:
            (partial / "assets" / name).write_bytes(resources.files("crossdiff.report").joinpath("assets", name).read_bytes())
        page = render_index(entries, partial, _behaviour(Path(path)), adl_section(Path(path)))
        (partial / "index.html").write_text(page, encoding="utf-8")
        commit_staging(partial, out)
    return out / "index.html"


def _behaviour(path: Path):
    """The run's behavioural diff: in the run folder given, or above a crosscoder or analysis folder."""
    for folder in (path, path.parent, path.parent.parent):
        found = read_behaviour(folder)
        if found is not None:
            return found
    return None


def default_out(path: Path) -> Path:
    """``RUN/report`` for a run folder; beside the analysis for an analysis folder."""
    is_analysis = (path / "latents.parquet").is_file() or (path / "summary.json").is_file()
    return (path.parent if is_analysis else path) / "report"


def _check_replaceable(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "index.html").is_file())):
        raise CrossdiffError(f"{out} exists and is not a crossdiff report; choose another --out")


def _keys(names: list[str]) -> list[str]:
    """File- and URL-safe keys, one per analysis, unique."""
    keys: list[str] = []
    for name in names:
        key = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "crosscoder"
        base, n = key, 2
        while key in keys:
            key, n = f"{base}_{n}", n + 1
        keys.append(key)
    return keys


def _dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
