"""`crossdiff score RUN_DIR`: grade a run's ranked findings against planted truth.

Each method of the run contributes its ranked findings:

* every crosscoder (a folder with ``analysis/latents.parquet`` and ``analysis/examples.sqlite``):
  its live latents ranked by relative decoder norm, most chat-leaning first, each with the
  top contexts analyze stored;
* every activation-difference baseline (a folder with ``adl.json``, `crossdiff adl`'s
  output): its positions in order, each with the top tokens of its logit lens in both
  models.

The top ``n_top`` (20) are graded against a truth file (crossdiff.organism.truth; by
default the bundled organism's):

* a crosscoder finding *hits* a behaviour when more than half of its top contexts match
  one of the behaviour's patterns; an ADL finding when at least a fifth of its lens tokens
  (both models' lists together) are the behaviour's tokens; the behaviour with the largest
  share wins;
* a finding also hits a behaviour when steering with it made the base show the behaviour
  (crossdiff.organism.steered: the crosscoder's planted-steering stage, the ADL's steering rows);
* a finding is about the *chat template* when its template share (analyze's) is above 0.5
  or more than half of its top examples (lens tokens) are template tokens;
* recall = behaviours hit by some finding in the top n / behaviours;
  precision = findings in the top n that hit a behaviour or the template / n;
* steering success per behaviour: the best steering result of the method for it, whether or
  not the steered latents are among its top n (null where the run has none).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossdiff.errors import CrossdiffError
from crossdiff.files import write_text_atomic
from crossdiff.locks import output_lock
from crossdiff.organism.steered import MOST, adl_success, planted_success
from crossdiff.organism.truth import Truth, load_truth

N_TOP = 20
LENS_SHARE = 0.2
"""An ADL finding hits a behaviour when at least this share of its lens tokens are the behaviour's."""
SCORE_NAME = "score.json"


@dataclass
class Finding:
    """One ranked finding: a latent (or an ADL position) with what it was found on."""

    latent: int | str
    value: float
    """What ranks it: relative decoder norm (a crosscoder's latent) or ||delta_p|| (an ADL position)."""
    contexts: list[str]
    """Text of each top example's window, or each lens token of an ADL position."""
    tokens: list[str]
    """The token each top example sits on (the lens tokens again for an ADL position)."""
    template_share: float | None
    lens: bool = False
    """contexts are single logit-lens tokens (matched with Behaviour.matches_token)."""
    steered: list[str] = field(default_factory=list)
    """Behaviours that steering with this finding made the base show."""


def default_truth_path() -> Path:
    return Path(__file__).parent / "truth.json"


def crosscoder_findings(analysis_dir: Path, n_top: int = N_TOP, *, latents: list[int] | None = None) -> list[Finding]:
    """The top ``n_top`` live latents by dnorm (:func:`_by_dnorm`; or the given ``latents``, in order), with their top contexts."""
    from crossdiff.analysis.read import AnalysisOutput  # pandas: deferred so that `crossdiff score --help` stays fast

    output = AnalysisOutput(analysis_dir)
    table = output.table(explanations=False)
    if latents is None:
        chosen = _by_dnorm(table[~table["dead"] & table["dnorm"].notna()]).head(n_top)
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


def _by_dnorm(table: Any) -> Any:
    """Latents most chat-leaning first; ties in dnorm broken by Latent Scaling's rank-sum (low,
    the most chat-specific, first; guarded latents after decided ones), then by index. A DFC's
    chat-exclusive latents all have dnorm exactly 1, so without the rank-sum its top findings
    would be its first chat-exclusive latents by index, an order that means nothing."""
    keys = table.assign(_rank_sum=table["rank_sum"] if "rank_sum" in table else float("nan"))
    order = keys.sort_values(["dnorm", "_rank_sum", "latent"], ascending=[False, True, True], na_position="last")
    return table.loc[order.index]


def adl_findings(adl_dir: Path, n_top: int = N_TOP, shows: dict[str, list[str]] | None = None) -> list[Finding]:
    """An ADL run's positions in order (the first ``n_top``), each with both lenses' tokens
    and the behaviours steering with its difference made the base show (``shows``)."""
    summary = json.loads((adl_dir / "adl.json").read_text())
    findings = []
    for row in summary["by_position"][:n_top]:
        name = f"pos {row['position']}"
        tokens = list(row["lens_chat"]) + list(row["lens_base"])
        findings.append(Finding(name, float(row["norm"]), tokens, tokens, None, lens=True, steered=(shows or {}).get(name, [])))
    return findings


def grade(findings: list[Finding], truth: Truth, steering: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Recall, precision, each finding's label (a behaviour, 'chat template' or None) and the
    behaviours steering with it showed; ``steering`` is each behaviour's best steering result."""
    rows = [{"rank": rank, "latent": finding.latent, "value": finding.value, **_label(finding, truth),
             "steered": list(finding.steered)} for rank, finding in enumerate(findings, start=1)]
    names = [b.name for b in truth.behaviours]
    found = {name: min((r["rank"] for r in rows if r["label"] == name or name in r["steered"]), default=None)
             for name in names}
    correct = sum(r["label"] is not None or bool(r["steered"]) for r in rows)
    return {
        "n_top": len(rows),
        "recall": sum(rank is not None for rank in found.values()) / len(names),
        "precision": correct / len(rows) if rows else 0.0,
        "first_rank": found,
        "steering_success": {name: (steering or {}).get(name) for name in names},
        "findings": rows,
    }


def _label(finding: Finding, truth: Truth) -> dict[str, Any]:
    """The behaviour whose patterns (or tokens) the finding's contexts match enough, else
    'chat template' when enough of its tokens are the template's, else None; with the share."""
    n = len(finding.contexts)

    def enough(share: float) -> bool:
        return share >= LENS_SHARE if finding.lens else share > MOST

    label, best = None, 0.0
    for behaviour in truth.behaviours:
        match = behaviour.matches_token if finding.lens else behaviour.matches
        share = sum(match(text) for text in finding.contexts) / n if n else 0.0
        if enough(share) and share > best:
            label, best = behaviour.name, share
    if label is None:
        on_template = sum(truth.is_template(token) for token in finding.tokens) / n if n else 0.0
        if (finding.template_share or 0.0) > MOST or on_template > MOST:
            label, best = "chat template", max(on_template, finding.template_share or 0.0)
    return {"label": label, "share": best}


def score_run(run_dir: str | Path, truth_path: str | Path | None = None, n_top: int = N_TOP,
              adl_dirs: list[str | Path] | None = None) -> dict[str, Any]:
    """Grade every analysed crosscoder and every ADL output of ``run_dir`` (and the ADL
    outputs ``adl_dirs``); writes RUN_DIR/score.json."""
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
            methods[output.name] = grade_crosscoder(output.folder, truth, n_top)
    for adl in sorted({*(p.parent for p in run_dir.glob("*/adl.json")), *map(Path, adl_dirs or [])}):
        if not (adl / "adl.json").is_file():
            raise CrossdiffError(f"{adl} holds no adl.json: give a folder `crossdiff adl --out` wrote")
        name = adl.name if adl.name not in methods else f"{adl.name} (adl)"
        methods[name] = grade_adl(adl, truth, n_top)
    if not methods:
        raise CrossdiffError(f"{run_dir} holds no analysed crosscoder (no */analysis/latents.parquet with examples.sqlite) "
                             "and no ADL output (*/adl.json); run `crossdiff analyze` or `crossdiff adl` first")
    result = {"truth": str(truth_path), "organism": truth.organism, "behaviours": [b.name for b in truth.behaviours],
              "methods": methods}
    with output_lock(run_dir, "score"):
        write_text_atomic(run_dir / SCORE_NAME, json.dumps(result, indent=2) + "\n")
    return result


def grade_crosscoder(analysis_dir: Path, truth: Truth, n_top: int = N_TOP) -> dict[str, Any]:
    """One crosscoder's grade, with its planted-steering results when the run has them."""
    steering = planted_success(analysis_dir.parent / "causal" / "planted" / "summary.json", truth)
    findings = crosscoder_findings(analysis_dir, n_top)
    for finding in findings:
        finding.steered = [name for name, r in steering.items() if r["success"] and finding.latent in r["by"]]
    return {"kind": "crosscoder", "ranked_by": "relative decoder norm", **grade(findings, truth, steering)}


def grade_adl(adl_dir: Path, truth: Truth, n_top: int = N_TOP) -> dict[str, Any]:
    """One activation-difference baseline's grade, with its steering rows when it has them."""
    rows_path = adl_dir / "adl_steering.jsonl"
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()] if rows_path.is_file() else []
    steering, shows = adl_success(rows, truth)
    return {"kind": "adl", "ranked_by": "position", **grade(adl_findings(adl_dir, n_top, shows), truth, steering)}


def format_score(result: dict[str, Any]) -> str:
    lines = [f"{'method':<16} {'recall':>7} {'precision':>9}  first rank of each behaviour; steering success"]
    for name, graded in result["methods"].items():
        ranks = ", ".join(f"{b} {r if r is not None else '-'}" for b, r in graded["first_rank"].items())
        lines.append(f"{name:<16} {graded['recall']:>7.2f} {graded['precision']:>9.2f}  {ranks}; "
                     f"steering {format_steering(graded['steering_success'])}")
    lines.append("(top findings: a crosscoder's latents by relative decoder norm, an ADL's positions; steering: the best "
                 "factor's answers showing the behaviour, of the prompts, 'yes' when more than half and more than unsteered "
                 "and every control)")
    return "\n".join(lines)


def format_steering(success: dict[str, dict[str, Any] | None]) -> str:
    """'refusal 7/10 yes, identity 0/10 no, arithmetic -' (- : not measured)."""
    parts = []
    for name, record in success.items():
        if record is None:
            parts.append(f"{name} -")
        else:
            parts.append(f"{name} {record['steered']}/{record['prompts']} {'yes' if record['success'] else 'no'}")
    return ", ".join(parts)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score", description="Grade each analysed crosscoder and each activation-difference baseline (adl.json) of RUN_DIR "
                    "against a truth file: recall and precision of the top findings, steering success per behaviour; "
                    "writes RUN_DIR/score.json.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--truth", help="truth file (default: the bundled organism's)")
    parser.add_argument("--top", type=int, default=N_TOP, help=f"findings graded per method (default {N_TOP})")
    parser.add_argument("--adl", action="append", default=[], metavar="DIR",
                        help="also grade this `crossdiff adl --out` folder (RUN_DIR/*/adl.json are found without it)")
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    if args.top <= 0:
        raise CrossdiffError(f"--top must be positive, got {args.top}")
    print(format_score(score_run(args.run_dir, args.truth, args.top, args.adl)))
    return 0
