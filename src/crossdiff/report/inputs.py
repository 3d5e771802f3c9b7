"""What a report is built from: the finished analyses of a run folder, read and checked.

A report takes a run folder (``RUN/<name>/analysis/`` for every crosscoder ``<name>``), one
crosscoder's folder (``RUN/<name>`` with ``analysis/``) or an analysis folder itself. Each
analysis brings its latent table, summary, twins and examples, and from the crosscoder's
folder the training record and, when the causal stage has run, ``causal/kl.parquet`` and
``causal/steering.jsonl``. Everything beyond the core columns is optional: the report
shows what exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from crossdiff.analysis.concepts import read_findings
from crossdiff.analysis.table import join_explanations
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
    """Every finished analysis under ``path``, in name order; one clear error if none."""
    path = Path(path)
    if not path.is_dir():
        raise CrossdiffError(f"{path} is not a folder (give a run folder, a crosscoder folder or an analysis folder)")
    if _looks_like_analysis(path):
        folders = [path]
    elif _looks_like_analysis(path / "analysis"):
        folders = [path / "analysis"]
    else:
        folders = sorted(child / "analysis" for child in path.iterdir() if _looks_like_analysis(child / "analysis"))
    if not folders:
        raise CrossdiffError(
            f"no analysis found in {path}: expected latents.parquet and summary.json (crossdiff analyze --out), "
            "or RUN/<name>/analysis/ folders"
        )
    return [read_analysis(folder) for folder in folders]


def read_analysis(folder: str | Path) -> Analysis:
    folder = Path(folder)
    name = folder.parent.name if folder.name == "analysis" else folder.name
    summary_path, table_path = folder / "summary.json", folder / "latents.parquet"
    if not summary_path.is_file():
        raise CrossdiffError(f"the analysis in {folder} is unfinished (no summary.json, written last): rerun crossdiff analyze")
    if not table_path.is_file():
        raise CrossdiffError(f"the analysis in {folder} has no latents.parquet: rerun crossdiff analyze")
    try:
        summary = json.loads(summary_path.read_text())
        table = join_explanations(pd.read_parquet(table_path), folder)  # autointerp's columns, when present
    except (ValueError, OSError) as err:
        raise CrossdiffError(f"cannot read the analysis in {folder}: {err}") from None
    missing = [column for column in REQUIRED_COLUMNS if column not in table.columns]
    if missing or not isinstance(summary, dict) or "orientation" not in summary:
        what = f"latents.parquet lacks {', '.join(missing)}" if missing else "summary.json does not state the dnorm orientation"
        raise CrossdiffError(f"the analysis in {folder} is of an older format ({what}): rerun crossdiff analyze")
    table = table.sort_values("latent", ignore_index=True)
    analysis = Analysis(name=name, folder=folder, table=table, summary=summary)
    twins = folder / "twins.parquet"
    analysis.twins = pd.read_parquet(twins) if twins.is_file() else None
    examples = folder / "examples.sqlite"
    analysis.examples = examples if examples.is_file() else None
    analysis.training = _training_record(analysis.crosscoder_dir)
    _read_findings(analysis)
    _read_causal(analysis)
    return analysis


def _looks_like_analysis(folder: Path) -> bool:
    return (folder / "latents.parquet").is_file() or (folder / "summary.json").is_file()


def _training_record(crosscoder_dir: Path) -> dict[str, Any]:
    """Steps, batch size and tokens seen, from train_config.json and the last metrics row."""
    record: dict[str, Any] = {}
    config = crosscoder_dir / "train_config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
            record.update({key: data[key] for key in ("steps", "batch_size", "activation") if key in data})
        except ValueError:
            pass
    metrics = crosscoder_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in reversed(metrics.read_text().splitlines()):
            try:
                last = json.loads(line)
            except ValueError:
                continue  # a line cut by an interrupted run
            if isinstance(last, dict) and "tokens" in last:
                record["tokens"] = last["tokens"]
                record["step"] = last.get("step")
                break
    if "tokens" not in record and "steps" in record and "batch_size" in record:
        record["tokens"] = record["steps"] * record["batch_size"]
    return record


def _read_findings(analysis: Analysis) -> None:
    try:
        analysis.findings = read_findings(analysis.crosscoder_dir)
    except (ValueError, OSError) as err:
        analysis.notes.append(f"{analysis.crosscoder_dir / 'findings.json'}: unreadable ({err}); the concepts are left out")


def _read_causal(analysis: Analysis) -> None:
    causal = analysis.crosscoder_dir / "causal"
    kl_path, steering_path = causal / "kl.parquet", causal / "steering.jsonl"
    if kl_path.is_file():
        try:
            kl = pd.read_parquet(kl_path)
        except (ValueError, OSError) as err:
            analysis.notes.append(f"{kl_path}: unreadable ({err}); the KL table and figure are left out")
        else:
            missing = [c for c in KL_COLUMNS if c not in kl.columns]
            if missing:
                analysis.notes.append(f"{kl_path} lacks {', '.join(missing)}; the KL table and figure are left out")
            else:
                analysis.kl = kl
    planted_path = causal / "planted" / "summary.json"
    if planted_path.is_file():
        try:
            analysis.planted = json.loads(planted_path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as err:
            analysis.notes.append(f"{planted_path}: unreadable ({err}); the planted-behaviour steering is left out")
    if steering_path.is_file():
        rows = []
        for number, line in enumerate(steering_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                analysis.notes.append(f"{steering_path}:{number}: not JSON; line skipped")
                continue
            if isinstance(row, dict) and all(key in row for key in STEERING_KEYS):
                rows.append(row)
            else:
                analysis.notes.append(f"{steering_path}:{number}: lacks one of {', '.join(STEERING_KEYS)}; line skipped")
        if rows:
            analysis.steering = pd.DataFrame(rows)
