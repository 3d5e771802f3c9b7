"""The report's activation-difference baseline section: each `crossdiff adl` output of the run
(RUN/*/adl.json), shown next to the crosscoders' findings.

Per position: ||delta_p||, the top tokens of its logit lens in each model, and, when the run
was scored (RUN/score.json, `crossdiff score`), the behaviour each position was graded as;
then the steering results: each behaviour's best steering vector as score graded it, or,
without a score, the answers matching the run's own ``--expect`` per vector and factor.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from crossdiff.causal.steer import match_counts

LENS_SHOWN = 6


def adl_section(run_dir: Path) -> str:
    """The section's HTML, or "" when the run has no ADL output."""
    folders = sorted(p.parent for p in Path(run_dir).glob("*/adl.json"))
    if not folders:
        return ""
    score_path = Path(run_dir) / "score.json"
    scored = json.loads(score_path.read_text()).get("methods", {}) if score_path.is_file() else {}
    cards = "".join(_card(folder, scored.get(folder.name)) for folder in folders)
    return ('<h2>Activation-difference baseline</h2>\n<p class="note">No crosscoder: the mean chat-minus-base residual at '
            'each of the first positions of unrelated text (<code>crossdiff adl</code>), read through each model\'s '
            'unembedding (logit lens) and steered into the models as a direction.</p>\n'
            f'<div class="columns">{cards}</div>\n')


def _card(folder: Path, graded: dict[str, Any] | None) -> str:
    summary = json.loads((folder / "adl.json").read_text())
    labels = {r["latent"]: r for r in (graded or {}).get("findings", [])}
    body = []
    for row in summary.get("by_position", []):
        mine = labels.get(f"pos {row['position']}") or {}
        label = ", ".join(filter(None, [mine.get("label"), *(f"steering: {b}" for b in mine.get("steered", []))])) or "–"
        body.append(f"<tr><td>{row['position']}</td><td>{row['norm']:.3g}</td><td class=\"context\">{_tokens(row['lens_chat'])}</td>"
                    f"<td class=\"context\">{_tokens(row['lens_base'])}</td><td>{_e(label if graded else '–')}</td></tr>")
    grade = ""
    if graded:
        grade = f"<p>Graded by <code>crossdiff score</code>: recall {graded['recall']:.2f}, precision {graded['precision']:.2f}.</p>"
    return (f'<div class="card adl"><h3>{_e(folder.name)}</h3><p>layer {_e(summary.get("layer"))}, '
            f'{_e(summary.get("documents"))} documents</p>{grade}'
            '<table class="grid findings"><tr><th>position</th><th>|delta|</th><th>chat lens</th><th>base lens</th>'
            f'<th>graded as</th></tr>{"".join(body)}</table>{_steering(folder, graded)}</div>')


def _steering(folder: Path, graded: dict[str, Any] | None) -> str:
    """Score's best steering result per behaviour, else the rows' own --expect counts."""
    if graded and any(graded.get("steering_success", {}).values()):
        body = "".join(
            f"<tr><td>{_e(b)}</td><td>{_e(r['by'])}</td><td>x{_e(r['factor'])}</td><td>{r['steered']}/{r['prompts']}</td>"
            f"<td>{'–' if r['controls_max'] is None else r['controls_max']}</td><td>{'yes' if r['success'] else 'no'}</td></tr>"
            for b, r in graded["steering_success"].items() if r)
        return ('<h4>Steered into the base (best vector per behaviour, answers showing it, of the prompts)</h4>'
                '<table class="grid planted"><tr><th>behaviour</th><th>vector</th><th>factor</th><th>steered</th>'
                f'<th>controls max</th><th>success</th></tr>{body}</table>')
    path = folder / "adl_steering.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    if not rows or any(r.get("matches") is None for r in rows):
        return ""

    counts = match_counts(rows)
    factors = [c for c in counts.columns if isinstance(c, float)]
    head = "".join(f"<th>x{f:g}</th>" for f in factors)
    body = "".join(f"<tr><td>{_e(r['set'])}</td><td>{int(r['unsteered'])}/{int(r['prompts'])}</td>"
                   + "".join(f"<td>{int(r[f])}</td>" for f in factors) + "</tr>" for _, r in counts.iterrows())
    return (f'<h4>Steering: answers matching --expect</h4><table class="grid planted"><tr><th>vector</th><th>unsteered</th>'
            f'{head}</tr>{body}</table>')


def _tokens(tokens: list[str]) -> str:
    return " ".join(f"<code>{_e(repr(t)[1:-1])}</code>" for t in tokens[:LENS_SHOWN])


def _e(value: Any) -> str:
    return html.escape(str(value))
