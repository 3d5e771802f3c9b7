"""`crossdiff score RUN_DIR`: grade a run's ranked findings against planted truth.

Every crosscoder of the run (a folder with ``analysis/latents.parquet`` and
``analysis/examples.sqlite``) contributes its findings: its live latents ranked by
relative decoder norm, most chat-leaning first. The top ``n_top`` (20) are graded against
a truth file (crossdiff.organism.truth; by default the bundled organism's):

* a finding *hits* a behaviour when more than half of its top contexts (the example
  windows analyze stored) match one of the behaviour's patterns; the behaviour with the
  largest share wins;
* a finding is about the *chat template* when its template share (analyze's) is above 0.5
  or more than half of its top examples sit on a template token;
* recall = behaviours hit by some finding in the top n / behaviours;
  precision = findings in the top n that hit a behaviour or the template / n.

Steering success per behaviour needs the models and is not measured here (score.json says
so); `crossdiff steer --expect` with a behaviour's prompts and expect pattern measures it.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossdiff.errors import CrossdiffError
from crossdiff.files import write_text_atomic
from crossdiff.locks import output_lock
from crossdiff.organism.truth import Truth, load_truth

N_TOP = 20
MOST = 0.5
SCORE_NAME = "score.json"


@dataclass
class Finding:
    """One ranked finding: a latent with its stored top contexts."""

    latent: int
    dnorm: float
    contexts: list[str]
    """Text of each top example's window."""
    tokens: list[str]
    """The token each top example sits on."""
    template_share: float | None


def default_truth_path() -> Path:
    return Path(__file__).parent / "truth.json"


def crosscoder_findings(analysis_dir: Path, n_top: int = N_TOP, *, latents: list[int] | None = None) -> list[Finding]:
    """The top ``n_top`` live latents by dnorm (or the given ``latents``, in order), with their top contexts."""
    from crossdiff.analysis.read import AnalysisOutput  # pandas: deferred so that `crossdiff score --help` stays fast

    output = AnalysisOutput(analysis_dir)
    table = output.table(explanations=False)
    if latents is None:
        chosen = table[~table["dead"] & table["dnorm"].notna()].sort_values(["dnorm", "latent"], ascending=[False, True]).head(n_top)
    else:
        chosen = table.set_index("latent").loc[latents].reset_index()
    findings = []
    with output.example_store() as store:
        for record in chosen.to_dict("records"):
            examples = store.examples(int(record["latent"]), "top")
            contexts = ["".join(ex.tokens or []) for ex in examples]
            tokens = [(ex.tokens or [""] * (ex.token_index + 1))[ex.token_index] for ex in examples]
            share = record.get("template_share")
            share = None if share is None or (isinstance(share, float) and math.isnan(share)) else float(share)
            findings.append(Finding(int(record["latent"]), float(record["dnorm"]), contexts, tokens, share))
    return findings


def grade(findings: list[Finding], truth: Truth) -> dict[str, Any]:
    """Recall, precision and each finding's label (a behaviour, 'chat template' or None)."""
    rows = []
    for rank, finding in enumerate(findings, start=1):
        label, share = None, 0.0
        n = len(finding.contexts)
        for behaviour in truth.behaviours:
            hits = sum(behaviour.matches(text) for text in finding.contexts) / n if n else 0.0
            if hits > MOST and hits > share:
                label, share = behaviour.name, hits
        if label is None:
            on_template = sum(truth.is_template(token) for token in finding.tokens) / n if n else 0.0
            if (finding.template_share or 0.0) > MOST or on_template > MOST:
                label, share = "chat template", max(on_template, finding.template_share or 0.0)
        rows.append({"rank": rank, "latent": finding.latent, "dnorm": finding.dnorm, "label": label, "share": share})
    names = [b.name for b in truth.behaviours]
    found = {name: min((r["rank"] for r in rows if r["label"] == name), default=None) for name in names}
    correct = sum(r["label"] is not None for r in rows)
    return {
        "n_top": len(rows),
        "recall": sum(rank is not None for rank in found.values()) / len(names),
        "precision": correct / len(rows) if rows else 0.0,
        "first_rank": found,
        "steering_success": {name: None for name in names},
        "findings": rows,
    }


def score_run(run_dir: str | Path, truth_path: str | Path | None = None, n_top: int = N_TOP) -> dict[str, Any]:
    """Grade every analysed crosscoder of ``run_dir``; writes RUN_DIR/score.json."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CrossdiffError(f"run folder not found: {run_dir}")
    truth_path = Path(truth_path) if truth_path is not None else default_truth_path()
    truth = load_truth(truth_path)
    methods = {}
    from crossdiff.analysis.read import AnalysisOutput  # pandas, as above

    for table in sorted(run_dir.glob("*/analysis/latents.parquet")):
        output = AnalysisOutput(table.parent)
        if output.examples_path is not None:
            methods[output.name] = grade(crosscoder_findings(output.folder, n_top), truth)
    if not methods:
        raise CrossdiffError(f"{run_dir} holds no analysed crosscoder (no */analysis/latents.parquet with examples.sqlite); "
                             "run `crossdiff analyze` first")
    result = {"truth": str(truth_path), "organism": truth.organism, "behaviours": [b.name for b in truth.behaviours],
              "steering": "not measured by score: run `crossdiff steer --expect` with each behaviour's prompts",
              "methods": methods}
    with output_lock(run_dir, "score"):
        write_text_atomic(run_dir / SCORE_NAME, json.dumps(result, indent=2) + "\n")
    return result


def format_score(result: dict[str, Any]) -> str:
    lines = [f"{'method':<16} {'recall':>7} {'precision':>9}  first rank of each behaviour"]
    for name, graded in result["methods"].items():
        ranks = ", ".join(f"{b} {r if r is not None else '-'}" for b, r in graded["first_rank"].items())
        lines.append(f"{name:<16} {graded['recall']:>7.2f} {graded['precision']:>9.2f}  {ranks}")
    lines.append(f"(top {next(iter(result['methods'].values()))['n_top']} findings by relative decoder norm; "
                 f"steering success: {result['steering']})")
    return "\n".join(lines)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score", description="Grade each analysed crosscoder of RUN_DIR against a truth file (recall and precision of its "
                    "top findings); writes RUN_DIR/score.json.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--truth", help="truth file (default: the bundled organism's)")
    parser.add_argument("--top", type=int, default=N_TOP, help=f"findings graded per method (default {N_TOP})")
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    if args.top <= 0:
        raise CrossdiffError(f"--top must be positive, got {args.top}")
    print(format_score(score_run(args.run_dir, args.truth, args.top)))
    return 0
