"""index.html: the overview and the figures as static HTML, the table and latent panels as
containers the page's script (assets/app.js) fills from the data files."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import pandas as pd

from crossdiff import __version__
from crossdiff.analysis.norms import TAGS
from crossdiff.report.figures import FIGURE_TEXT, FigureFile
from crossdiff.report.inputs import Analysis


def render_index(entries: list[tuple[str, Analysis, list[FigureFile]]], out: Path,
                 behaviour: tuple[list[dict[str, Any]], dict[str, Any]] | None = None, adl: str = "") -> str:
    """The whole page; ``entries`` are (key, analysis, figures) in display order; ``behaviour``
    the run's behavioural diff (crossdiff.causal.behaviour.read_behaviour), shown first;
    ``adl`` the activation-difference baseline's section (crossdiff.report.adl), after the overview."""
    first = entries[0][1].summary.get("crosscoder") or {}
    models = first.get("model_names") or []
    subtitle = " vs ".join(f"<code>{_e(_short(m))}</code>" for m in models) if models else ""
    if first.get("layer") is not None:
        subtitle += f", layer {_e(first['layer'])}"
    scripts = "\n".join(f'<script src="data/{key}/table.js"></script>' for key, _, _ in entries)
    nav = "".join(f'<a href="#latents/{key}">{_e(a.name)}</a>' for key, a, _ in entries)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>crossdiff report: {_e(", ".join(a.name for _, a, _ in entries))}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="assets/style.css">
</head>
<body>
<header>
  <h1><a href="#overview">crossdiff report</a></h1>
  <div class="subtitle">{subtitle}</div>
  <nav><a href="#overview">Overview</a> <span class="navlabel">Latents:</span> {nav}</nav>
</header>
<main>
<section id="view-overview">
{_behaviour_section(behaviour)}
{_concepts_section(entries)}
  <h2>Overview</h2>
  <div class="columns">
{"".join(_overview_card(key, a) for key, a, _ in entries)}
  </div>
{adl}
  <h2>Figures</h2>
{_figure_rows(entries, out)}
</section>
<section id="view-latents" hidden></section>
<section id="view-latent" hidden></section>
</main>
<footer>Written by crossdiff {_e(__version__)}. Static files: open index.html from disk, no server or network needed.
Figures are also in <code>figures/&lt;crosscoder&gt;/</code> as PNG and SVG.</footer>
<script>window.CROSSDIFF = {{tables: {{}}, order: {[key for key, _, _ in entries]!r}, addTable(key, data) {{ this.tables[key] = data; }}}};</script>
{scripts}
<script src="assets/app.js"></script>
</body>
</html>
"""


def _overview_card(key: str, analysis: Analysis) -> str:
    s = analysis.summary
    cc = s.get("crosscoder") or {}
    quality = s.get("quality") or {}
    kind = {"relu": "L1 (ReLU)", "batchtopk": "BatchTopK", "topk": "TopK"}.get(cc.get("activation"), cc.get("activation"))
    if cc.get("activation") in ("batchtopk", "topk") and cc.get("k"):
        kind = f"{kind}, k = {cc['k']}"
    size = None
    if cc.get("d_sae") and cc.get("d_in"):
        size = f"{cc['d_sae']:,} latents on d = {cc['d_in']:,} ({cc['d_sae'] / cc['d_in']:g}x)"
    rows = [
        ("crosscoder", kind),
        ("dictionary", size or f"{s.get('n_latents', len(analysis.table)):,} latents"),
        ("layer", cc.get("layer")),
        ("training tokens", _count(analysis.training.get("tokens"))),
        ("tokens analysed", _count(s.get("n_tokens"))),
        ("FVE base / chat", _pair(quality.get("fve_base"), quality.get("fve_chat"))),
        ("FVE joint", _num(quality.get("fve"))),
        ("L0", _num(quality.get("l0"), 1)),
        ("dead", f"{s.get('dead', 0):,} ({100 * (s.get('dead_fraction') or 0):.1f}%)" if "dead" in s else None),
    ]
    tags = s.get("tags") or {}
    tag_cells = "".join(
        f'<a class="tag tag-{_e(t)}" href="#latents/{key}?tag={_e(t)}">{_e(t)} <b>{tags.get(t, 0):,}</b></a>'
        for t in TAGS if t in tags)
    co = s.get("chat_only") or {}
    verdict = ""
    if co:
        verdict = f"""<table class="kv verdicts">
<tr><th>chat-only latents</th><td>{co.get('total', 0):,}</td></tr>
<tr><th>confirmed chat-specific</th><td>{co.get('chat_specific', 0):,}</td></tr>
<tr><th>rejected: Complete Shrinkage</th><td>{co.get('complete_shrinkage', 0):,}</td></tr>
<tr><th>rejected: Latent Decoupling</th><td>{co.get('latent_decoupling', 0):,}</td></tr>
<tr><th>&nbsp;&nbsp;both</th><td>{co.get('shrinkage_and_decoupling', 0):,}</td></tr>
<tr><th>no estimate</th><td>{co.get('no_estimate', 0):,}</td></tr>
<tr><th>with a base-only twin</th><td>{co.get('with_twin', 0):,}</td></tr>
</table>"""
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>\n" for k, v in rows if v not in (None, ""))
    return f"""<div class="card" data-key="{key}">
<h3>{_e(analysis.name)}</h3>
<table class="kv">{body}</table>
<div class="tags">{tag_cells}</div>
{verdict}
{_findings_table(key, s.get("findings") or {})}
{_planted_table(analysis.planted)}
{_kl_table(analysis.kl)}
<p><a class="button" href="#latents/{key}">Latent table &rarr;</a></p>
</div>
"""


FINDINGS_ROWS = 10


def _findings_table(key: str, findings: dict[str, Any]) -> str:
    """The analysis's top chat-leaning latents, by relative norm and by Latent Scaling rank-sum,
    each with its verdict and top context, linked to its page: what to look at first."""
    tables = []
    for source, title in (("top_by_dnorm", "by relative decoder norm"), ("top_by_rank_sum", "by Latent Scaling rank-sum")):
        rows = (findings.get(source) or [])[:FINDINGS_ROWS]
        if not rows:
            continue
        body = "".join(
            f'<tr><td><a href="#latent/{key}/{int(r["latent"])}">{int(r["latent"])}</a></td><td>{_num(r.get("dnorm"), 2) or "–"}</td>'
            f'<td>{_e(r.get("verdict") or "–")}</td><td class="context">{_e(r.get("context") or "")}</td></tr>'
            for r in rows)
        tables.append(f'<h4>Top findings {title}</h4><table class="grid findings"><tr><th>latent</th><th>dnorm</th>'
                      f'<th>verdict</th><th>top context</th></tr>{body}</table>')
    return "".join(tables)


def _planted_table(planted: dict[str, Any] | None) -> str:
    """Per planted behaviour: its latents and how often steering them into the base shows it, against controls."""
    if not planted or not planted.get("behaviours"):
        return ""
    factors = [f"{f:g}" for f in planted.get("factors", [])]
    head = "".join(f"<th>x{_e(f)}: steered / controls max</th>" for f in factors)
    body = []
    for r in planted["behaviours"]:
        n = r.get("prompts", 0)
        cells = "".join(f"<td>{r['steered'].get(f, 0)}/{n} / {max(r['controls'].get(f, []), default=0)}/{n}</td>" for f in factors)
        latents = ", ".join(str(j) for j in r.get("latents", []))
        ceiling = "–" if r.get("ceiling") is None else f"{r['ceiling']}/{n}"
        body.append(f"<tr><td>{_e(r.get('behaviour'))}</td><td>{_e(latents)}</td><td>{r.get('unsteered', 0)}/{n}</td>"
                    f"<td>{ceiling}</td>{cells}</tr>")
    return (f'<h4>Planted behaviours steered into the {_e(planted.get("model", "base"))} (answers showing each, of n held-out prompts)</h4>'
            f'<table class="grid planted"><tr><th>behaviour</th><th>latents</th><th>unsteered</th>'
            f'<th title="the base continued from the chat model\'s residual at the crosscoder\'s block: the most steering there can do">'
            f'ceiling</th>{head}</tr>{"".join(body)}</table>')


def _behaviour_section(behaviour: tuple[list[dict[str, Any]], dict[str, Any]] | None, top: int = 10) -> str:
    """What changed, before any latent: the behavioural diff's headline, groups, histogram and top prompts."""
    if behaviour is None:
        return ('<h2>What changed</h2><p class="muted">No behavioural diff in this run (a <code>[behaviour]</code> recipe '
                'table or <code>crossdiff behaviour</code> adds one: both models\' answers, ranked by KL).</p>')
    rows, summary = behaviour
    head = (f"<p>KL(chat &#8214; base) on the chat model's answer tokens, over {summary['prompts']:,} prompts: mean "
            f"<b>{_num(summary['kl_mean'])}</b> nats/token (95% CI {_num(summary['ci_low']) or '–'} to "
            f"{_num(summary['ci_high']) or '–'}), median prompt {_num(summary['median_prompt'])}. "
            "High KL: the base model would not have said what the chat model says.</p>")
    groups = ""
    if summary.get("groups"):
        cells = "".join(f"<tr><td>{_e(name)}</td><td>{_num(g['kl_mean'])} [{_num(g['ci_low']) or '–'}, {_num(g['ci_high']) or '–'}]"
                        f"</td><td>{g['prompts']:,}</td><td>{g['best_rank']}</td></tr>" for name, g in summary["groups"].items())
        groups = (f'<table class="grid behaviour-groups"><tr><th>group</th><th>KL per token (95% CI)</th><th>prompts</th>'
                  f'<th>best rank</th></tr>{cells}</table>')
    counts, edges = summary["histogram"]["counts"], summary["histogram"]["edges"]
    widest = max(counts) or 1
    bars = "".join(f'<div title="{edges[i]:.2f}-{edges[i + 1]:.2f}: {c} prompts" style="height:{100 * c / widest:.0f}%"></div>'
                   for i, c in enumerate(counts))
    histogram = (f'<figure class="behaviour-histogram"><div class="bars">{bars}</div><figcaption>prompts per KL bin, '
                 f'{edges[0]:.2f} to {edges[-1]:.2f} nats/token</figcaption></figure>')
    lines = "".join(f"<tr><td>{r['rank']}</td><td>{_num(r['kl_mean'])}</td><td>{_e(r.get('group') or '')}</td>"
                    f"<td>{_e(r['prompt'])}</td><td>{_e(r['chat_answer'])}</td><td>{_e(r['base_answer'])}</td></tr>"
                    for r in rows[:top])
    table = (f'<table class="grid behaviour-top"><tr><th>rank</th><th>KL</th><th>group</th><th>prompt</th>'
             f'<th>chat answer</th><th>base answer</th></tr>{lines}</table>')
    return (f'<h2>What changed: the behavioural diff</h2><div id="behaviour">{head}<div class="columns">{groups}{histogram}</div>'
            f'<h4>Top {min(top, len(rows))} prompts by KL</h4>{table}'
            '<p class="muted">All prompts: <code>behaviour_diff.jsonl</code> in the run folder.</p></div>')


def _concepts_section(entries: list[tuple[str, Analysis, list[FigureFile]]], shown: int = 10) -> str:
    """The concepts of each crosscoder's findings.json (crossdiff.analysis.concepts), when the run has them."""
    from crossdiff.analysis.concepts import read_findings

    cards = []
    for key, analysis, _ in entries:
        findings = read_findings(analysis.crosscoder_dir)
        if findings is None:
            continue
        latents = {e["latent"]: e for e in findings["latents"]}
        rows = []
        for concept in findings["concepts"][:shown]:
            lead = latents[concept["lead"]]
            links = ", ".join(f'<a href="#latent/{key}/{i}">{i}</a>' for i in concept["latents"])
            kind = "chat template" if concept.get("kind") == "chat template" else _e(concept.get("group") or "")
            promotes = " ".join(_e(repr(t)) for t in concept.get("promotes_chat", []))
            rows.append(f"<tr><td>{concept['concept']}</td><td>{links}</td><td>{kind}</td><td>{lead['rank']}</td>"
                        f"<td>{_num(lead['dnorm'], 2)}</td><td>{_e(lead['verdict'])}</td><td><code>{_e(concept.get('context') or '')}</code></td>"
                        f"<td><code>{promotes}</code></td></tr>")
        cards.append(f'<div class="card concepts" data-key="{key}"><h3>{_e(analysis.name)}: {len(findings["concepts"])} concepts '
                     f'among the top {len(findings["latents"])} latents</h3><table class="grid"><tr><th>concept</th><th>latents</th>'
                     f'<th>group</th><th>best rank</th><th>dnorm</th><th>lead verdict</th><th>lead context</th>'
                     f'<th>promotes in chat</th></tr>{"".join(rows)}</table></div>')
    if not cards:
        return ""
    return ('<h2>Concepts: the latents that carry it</h2><p class="muted">Chat-leaning latents ranked by evidence (dnorm relative '
            'to its distribution, the contrast between high-KL and low-KL prompts, Latent Scaling rejections last) and grouped '
            'into concepts; <code>findings.json</code> beside each analysis holds every number.</p>'
            f'<div class="columns">{"".join(cards)}</div>')


def _kl_table(kl: pd.DataFrame | None) -> str:
    if kl is None or not len(kl):
        return '<p class="muted">Causal stage not run (<code>crossdiff causal</code> adds the KL table).</p>'
    extra = [c for c in ("n_tokens", "n_latents", "form") if c in kl.columns]
    head = "".join(f"<th>{c}</th>" for c in ["condition", "subset", "KL (95% CI)", *extra])
    rows = []
    for row in kl.itertuples(index=False):
        cells = [_e(row.condition), _e(row.subset),
                 f"{_num(row.kl_mean, 4) or '–'} [{_num(row.ci_low, 4) or '–'}, {_num(row.ci_high, 4) or '–'}]"]
        cells += [_e(_count(getattr(row, c)) if c != "form" else (getattr(row, c) or "")) for c in extra]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f'<h4>Causal effect (KL to the chat model)</h4><table class="grid kl"><tr>{head}</tr>{"".join(rows)}</table>'


def _figure_rows(entries: list[tuple[str, Analysis, list[FigureFile]]], out: Path) -> str:
    rows = []
    for name, (title, caption) in FIGURE_TEXT.items():
        cells, present = [], False
        for key, analysis, figures in entries:
            figure = next((f for f in figures if f.name == name), None)
            if figure is None:
                why = {"kl": "causal stage not run", "template": "no template_share column"}.get(name, "not available")
                cells.append(f'<figure class="missing"><figcaption>{_e(analysis.name)}: {why}</figcaption></figure>')
                continue
            present = True
            png, svg = figure.png.relative_to(out).as_posix(), figure.svg.relative_to(out).as_posix()
            cells.append(f'<figure><img src="{png}" alt="{_e(title)}, {_e(analysis.name)}" loading="lazy">'
                         f'<figcaption>{_e(analysis.name)} &middot; <a href="{png}">PNG</a> &middot; '
                         f'<a href="{svg}">SVG</a></figcaption></figure>')
        if present:
            rows.append(f'<div class="figure-row" id="figure-{name}"><h3>{_e(title)}</h3><p class="muted">{_e(caption)}</p>'
                        f'<div class="columns">{"".join(cells)}</div></div>')
    return "\n".join(rows)


def _short(model: str) -> str:
    """A hub id as is; a local path by its last two parts."""
    parts = Path(str(model)).parts
    return "/".join(parts[-2:]) if len(parts) > 2 else str(model)


def _num(value: Any, digits: int = 3) -> str | None:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return f"{value:.{digits}f}"


def _pair(a: Any, b: Any) -> str | None:
    return f"{_num(a)} / {_num(b)}" if a is not None and b is not None else None


def _count(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return f"{int(value):,}"


def _e(value: Any) -> str:
    return html.escape(str(value))
