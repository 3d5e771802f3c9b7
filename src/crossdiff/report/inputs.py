"""What a report is built from: the finished analyses of a run folder, read and checked.

Files are read by crossdiff.analysis.read (the one reader of an analysis folder); this
module decides what the report needs (the core columns, the dnorm orientation) and turns an
unreadable optional part into a note instead of an error.

A report takes a run folder (``RUN/<name>/analysis/`` for every crosscoder ``<name>``), one
crosscoder's folder (``RUN/<name>`` with ``analysis/``) or an analysis folder itself. Each
analysis brings its latent table, summary, twins and examples, and from the crosscoder's
folder the training record and, when the causal stage has run, ``causal/kl.parquet`` and
``causal/steering.jsonl``. Everything beyond the core columns is optional: the report
shows what exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from crossdiff.analysis.read import AnalysisOutput, run_outputs
from crossdiff.errors import CrossdiffError

REQUIRED_COLUMNS = ("latent", "dnorm", "tag", "dec_cos", "freq", "nu_error", "nu_recon")
"""Columns every analysis since the first release writes; the report needs them."""
KL_COLUMNS = ("condition", "subset", "kl_mean", "ci_low", "ci_high")
STEERING_KEYS = ("latent", "factor", "prompt", "steered")


@dataclass
class Analysis:
    name: str
    """The crosscoder's name in the run (``batchtopk``, ``l1``, ...)."""
    folder: Path
    """The analysis folder (latents.parquet, summary.json, ...)."""
    table: pd.DataFrame
    summary: dict[str, Any]
    twins: pd.DataFrame | None = None
    examples: Path | None = None
    """examples.sqlite, when the analysis kept examples."""
    training: dict[str, Any] = field(default_factory=dict)
    """Training record: ``tokens``, ``steps``, ``batch_size`` where known."""
    kl: pd.DataFrame | None = None
    """causal/kl.parquet, when the causal stage has run."""
    steering: pd.DataFrame | None = None
    """causal/steering.jsonl, when `crossdiff steer` has run."""
    planted: dict[str, Any] | None = None
    """causal/planted/summary.json, when a run's steer stage steered planted behaviours."""
    findings: dict[str, Any] | None = None
    """findings.json beside the analysis (crossdiff.analysis.concepts): ranked latents, concepts, logit lens."""
    notes: list[str] = field(default_factory=list)
    """Parts left out, one line each (printed by the CLI)."""

    @property
    def crosscoder_dir(self) -> Path:
        return self.folder.parent if self.folder.name == "analysis" else self.folder


def find_analyses(path: str | Path) -> list[Analysis]:
    """Every analysis under ``path``, in name order; one clear error if none or one is unfinished."""
    return [read_analysis(output.folder) for output in run_outputs(path)]


def read_analysis(folder: str | Path) -> Analysis:
    """One analysis as the report needs it: the core read strictly (one clear error for an
    unfinished or older analysis), every optional part read forgivingly (a note, not an error)."""
    output = AnalysisOutput(folder)
    summary = output.summary()  # first: its absence means an unfinished analysis
    table = output.table(explanations=True, required=REQUIRED_COLUMNS)  # autointerp's columns, when present
    if not isinstance(summary, dict) or "orientation" not in summary:
        raise CrossdiffError(f"the analysis in {output.folder} is of an older format (summary.json does not state the "
                             "dnorm orientation): rerun crossdiff analyze")
    analysis = Analysis(name=output.name, folder=output.folder, table=table, summary=summary,
                        twins=output.twins(), examples=output.examples_path, training=output.training())
    analysis.findings = _optional(analysis, output.findings, "findings.json", "the concepts")
    analysis.planted = _optional(analysis, output.planted, "causal/planted/summary.json",
                                 "the planted-behaviour steering")
    kl = _optional(analysis, output.kl_table, "causal/kl.parquet", "the KL table and figure")
    missing = [c for c in KL_COLUMNS if kl is not None and c not in kl.columns]
    if missing:
        analysis.notes.append(f"{analysis.crosscoder_dir / 'causal' / 'kl.parquet'} lacks {', '.join(missing)}; "
                              "the KL table and figure are left out")
    elif kl is not None:
        analysis.kl = kl
    rows, notes = output.steering(required=STEERING_KEYS)
    analysis.notes += notes
    analysis.steering = pd.DataFrame(rows) if rows else None
    return analysis


def _optional(analysis: Analysis, read: Callable[[], Any], name: str, part: str) -> Any:
    """``read()``, or None with a note when the file is unreadable: an optional part never stops a report."""
    try:
        return read()
    except (CrossdiffError, ValueError, OSError) as err:
        analysis.notes.append(f"{analysis.crosscoder_dir / name}: unreadable ({err}); {part} left out")
        return None
