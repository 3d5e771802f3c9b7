"""One reader of an analysis output folder, and of what later stages leave beside it.

A crosscoder's outputs, as `crossdiff run` lays them out (``analyze --out`` may put an
analysis folder anywhere; then only the analysis files are there)::

    RUN/behaviour_diff.json(l)         the behavioural diff (crossdiff.causal.behaviour), one per run
    RUN/NAME/analysis/                 latents.parquet, summary.json (written last), examples.sqlite,
                                       twins.parquet, explanations.parquet (crossdiff explain)
    RUN/NAME/findings.json             ranked latents grouped into concepts (crossdiff.analysis.concepts)
    RUN/NAME/causal/                   kl.parquet, summary.json (the KL experiment), planted/summary.json,
                                       steering.jsonl (crossdiff steer)
    RUN/NAME/train_config.json         the training run's record, with metrics.jsonl (crossdiff train)

:class:`AnalysisOutput` opens any of ``RUN/NAME/analysis``, ``RUN/NAME`` or a bare analysis
folder and reads each file the same way for every terminal-side reader (inspect, causal,
explain, the report, the end screen of analyze, run and demo): one clear error for a missing or
unfinished analysis, ``None`` for an optional file that is not there. :func:`run_outputs`
lists the crosscoders of a run folder. Reading needs neither a model nor torch, except the
example store (crossdiff.analysis.examples), which is opened only when examples are asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from crossdiff.errors import CrossdiffError
from crossdiff.terminal import quoted

TABLE, SUMMARY, EXAMPLES, TWINS = "latents.parquet", "summary.json", "examples.sqlite", "twins.parquet"
FINDINGS = "findings.json"
BEHAVIOUR_ROWS, BEHAVIOUR_SUMMARY = "behaviour_diff.jsonl", "behaviour_diff.json"
CAUSAL_FILES = {"kl": "kl.parquet", "figure": "kl.png", "summary": "summary.json"}  # summary.json last: the mark of a finished run
STEERING = "steering.jsonl"
PLANTED = Path("planted") / "summary.json"


class AnalysisOutput:
    """An analysis folder and its crosscoder's other outputs (see the module docstring)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if _is_analysis(path):
            self.folder = path
        elif _is_analysis(path / "analysis"):
            self.folder = path / "analysis"
        else:
            raise CrossdiffError(f"{path} is not an analysis folder (no {TABLE}); run crossdiff analyze first")
        self.crosscoder_dir = self.folder.parent if self.folder.name == "analysis" else self.folder
        self.name = self.crosscoder_dir.resolve().name
        self._store = None
        self._contexts: dict[int, str | None] = {}

    # ------------------------------------------------------------------ the analysis
    def table(self, *, explanations: bool = True, required: tuple[str, ...] = ()) -> pd.DataFrame:
        """latents.parquet in latent order (row i is latent i), with autointerp's columns when
        ``explanations`` and explain has run; refused when a ``required`` column is missing."""
        from crossdiff.analysis.table import join_explanations  # deferred: imports torch; reading an analysis needs only pandas

        path = self.folder / TABLE
        if not path.is_file():
            raise CrossdiffError(f"{self.folder} has no {TABLE}: run crossdiff analyze first")
        try:
            table = pd.read_parquet(path)
        except (ValueError, OSError) as err:
            raise CrossdiffError(f"cannot read {path}: {err}") from None
        missing = [column for column in required if column not in table.columns]
        if missing:
            raise CrossdiffError(f"the analysis in {self.folder} is of an older format ({TABLE} lacks {', '.join(missing)}): "
                                 "rerun crossdiff analyze")
        if explanations:
            table = join_explanations(table, self.folder)
        return table.sort_values("latent", kind="stable", ignore_index=True)

    def summary(self) -> dict[str, Any]:
        """summary.json, which analyze writes last: its absence means an unfinished analysis."""
        path = self.folder / SUMMARY
        if not path.is_file():
            raise CrossdiffError(f"the analysis in {self.folder} is unfinished (no {SUMMARY}, written last): rerun crossdiff analyze")
        return _json(path)

    @property
    def finished(self) -> bool:
        return (self.folder / SUMMARY).is_file()

    @property
    def examples_path(self) -> Path | None:
        path = self.folder / EXAMPLES
        return path if path.is_file() else None

    def twins(self) -> pd.DataFrame | None:
        """twins.parquet (chat-only/base-only latent pairs), or None when analyze wrote none."""
        path = self.folder / TWINS
        return pd.read_parquet(path) if path.is_file() else None

    def require_examples(self, why: str = "") -> Path:
        if self.examples_path is None:
            raise CrossdiffError(f"{self.folder} has no {EXAMPLES} (analyze ran with --no-examples){f'; {why}' if why else ''}")
        return self.examples_path

    def example_store(self):
        """The examples file opened (crossdiff.analysis.examples.ExampleStore; close it, or use ``with``)."""
        from crossdiff.analysis.examples import ExampleStore  # torch: only when examples are read

        return ExampleStore(self.require_examples())

    def top_context(self, latent: int, *, before: int = 12, after: int = 3) -> str | None:
        """The latent's max-activating example, a short window with its token in [brackets],
        quoted and escaped for a terminal; None without examples or without one for the latent."""
        if latent not in self._contexts:
            if self.examples_path is None:
                return None
            if self._store is None:
                self._store = self.example_store()
            self._contexts[latent] = top_context(self._store, latent, before=before, after=after)
        return self._contexts[latent]

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> "AnalysisOutput":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ beside it
    def findings(self) -> dict[str, Any] | None:
        """RUN/NAME/findings.json (concepts), or None before the findings stage ran."""
        return read_findings(self.crosscoder_dir)

    def causal(self) -> tuple[pd.DataFrame, dict[str, Any]] | None:
        """The KL experiment's table and summary (RUN/NAME/causal/), or None when it has not finished."""
        summary = self.crosscoder_dir / "causal" / CAUSAL_FILES["summary"]
        kl = self.kl_table() if summary.is_file() else None
        return (kl, _json(summary)) if kl is not None else None

    def kl_table(self) -> pd.DataFrame | None:
        """causal/kl.parquet as it stands (rows are written before the summary), or None."""
        path = self.crosscoder_dir / "causal" / CAUSAL_FILES["kl"]
        if not path.is_file():
            return None
        try:
            return pd.read_parquet(path)
        except (ValueError, OSError) as err:
            raise CrossdiffError(f"cannot read {path}: {err}") from None

    def steering(self, required: tuple[str, ...] = ()) -> tuple[list[dict[str, Any]], list[str]]:
        """The rows of causal/steering.jsonl (crossdiff steer) and one note per line skipped:
        a line that is not JSON or lacks a ``required`` key. No file: no rows, no notes."""
        path = self.crosscoder_dir / "causal" / STEERING
        rows: list[dict[str, Any]] = []
        notes: list[str] = []
        if not path.is_file():
            return rows, notes
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                notes.append(f"{path}:{number}: not JSON; line skipped")
                continue
            if isinstance(row, dict) and all(key in row for key in required):
                rows.append(row)
            else:
                notes.append(f"{path}:{number}: lacks one of {', '.join(required)}; line skipped")
        return rows, notes

    def planted(self) -> dict[str, Any] | None:
        """The planted-behaviour steering summary (RUN/NAME/causal/planted/summary.json), or None."""
        path = self.crosscoder_dir / "causal" / PLANTED
        return _json(path) if path.is_file() else None

    def training(self) -> dict[str, Any]:
        """The training run's record beside the crosscoder: ``steps``, ``batch_size``,
        ``activation`` from train_config.json, ``tokens`` and ``step`` from the last complete line
        of metrics.jsonl (else steps x batch_size); empty when the crosscoder was not trained here."""
        record: dict[str, Any] = {}
        config = self.crosscoder_dir / "train_config.json"
        if config.is_file():
            try:
                data = json.loads(config.read_text(encoding="utf-8"))
                record.update({key: data[key] for key in ("steps", "batch_size", "activation") if key in data})
            except ValueError:
                pass
        metrics = self.crosscoder_dir / "metrics.jsonl"
        if metrics.is_file():
            for line in reversed(metrics.read_text(encoding="utf-8").splitlines()):
                try:
                    last = json.loads(line)
                except ValueError:
                    continue  # a line cut by an interrupted run
                if isinstance(last, dict) and "tokens" in last:
                    record["tokens"], record["step"] = last["tokens"], last.get("step")
                    break
        if "tokens" not in record and "steps" in record and "batch_size" in record:
            record["tokens"] = record["steps"] * record["batch_size"]
        return record

    def run_dir(self) -> Path | None:
        """The run folder holding this crosscoder: RUN of RUN/NAME/{analysis,crosscoder} (a run's layout), else None."""
        in_run = self.folder.name == "analysis" and (self.crosscoder_dir / "crosscoder").is_dir()
        return self.crosscoder_dir.parent if in_run else None

    def behaviour(self) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
        """The run's behavioural diff, or None (no run folder, or no behaviour stage)."""
        run = self.run_dir()
        return read_behaviour(run) if run is not None else None


def run_outputs(path: str | Path) -> list[AnalysisOutput]:
    """The crosscoders under ``path`` in name order: every RUN/NAME/analysis of a run folder, or
    the one analysis ``path`` is (or holds); one clear error when there is none."""
    path = Path(path)
    if not path.is_dir():
        raise CrossdiffError(f"{path} is not a folder (give a run folder, a crosscoder folder or an analysis folder)")
    if _is_analysis(path) or _is_analysis(path / "analysis"):
        return [AnalysisOutput(path)]
    found = [AnalysisOutput(child) for child in sorted(path.iterdir()) if _is_analysis(child / "analysis")]
    if not found:
        raise CrossdiffError(f"no analysis in {path}: expected {TABLE} (crossdiff analyze --out) or RUN/<name>/analysis/ folders")
    return found


def top_context(store: Any, latent: int, *, before: int = 12, after: int = 3) -> str | None:
    """The max-activating example of ``latent`` in an open ExampleStore: ``before`` and ``after``
    tokens around its token, which is in [brackets]; quoted and escaped; None if it has none."""
    from crossdiff.analysis.examples import render_example  # deferred: imports torch, like ExampleStore above

    top = store.examples(latent, "top")
    return quoted(render_example(top[0], before=before, after=after)) if top else None


def read_findings(folder: str | Path) -> dict[str, Any] | None:
    """``folder``/findings.json, or None if there is none."""
    path = Path(folder) / FINDINGS
    return _json(path) if path.is_file() else None


def read_behaviour(folder: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """The behavioural diff saved in a run folder (rows ranked by KL, and the summary), or None."""
    folder = Path(folder)
    if not (folder / BEHAVIOUR_SUMMARY).is_file():
        return None
    rows = [json.loads(line) for line in (folder / BEHAVIOUR_ROWS).read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows, _json(folder / BEHAVIOUR_SUMMARY)


def _is_analysis(folder: Path) -> bool:
    return (folder / TABLE).is_file()


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise CrossdiffError(f"cannot read {path}: {err}") from None
