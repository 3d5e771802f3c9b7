"""index.html: the overview and the figures as static HTML, the table and latent panels as
containers the page's script (assets/app.js) fills from the data files."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crossdiff import __version__
from crossdiff.analysis.norms import TAGS
from crossdiff.analysis.verdicts import MEANINGS, VERDICTS
from crossdiff.report.figures import FIGURE_TEXT, FigureFile, closed_shares, condition_labels, found_latents, verdicts
from crossdiff.report.inputs import Analysis
from crossdiff.terminal import latent_ids


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
{_causal_section(entries, out)}
  <h2>Overview</h2>
  <div class="columns">
{"".join(_overview_card(key, a) for key, a, _ in entries)}
  </div>
{adl}
{_verdict_legend()}
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
    verdict = _verdict_counts(analysis)
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>\n" for k, v in rows if v not in (None, ""))
    return f"""<div class="card overview" data-key="{key}">
<h3>{_e(analysis.name)}</h3>
<table class="kv">{body}</table>
<div class="tags">{tag_cells}</div>
{verdict}
{_findings_table(key, s.get("findings") or {})}
{_planted_table(analysis.planted)}
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
            f'{_verdict_cell(r.get("verdict"))}<td class="context">{_e(r.get("context") or "")}</td></tr>'
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
        latents = latent_ids(r.get("latents", []), 10)
        ceiling = "–" if r.get("ceiling") is None else f"{r['ceiling']}/{n}"
        body.append(f"<tr><td>{_e(r.get('behaviour'))}</td><td>{_e(latents)}</td><td>{r.get('unsteered', 0)}/{n}</td>"
                    f"<td>{ceiling}</td>{cells}</tr>")
    return (f'<h4>Planted behaviours steered into the {_e(planted.get("model", "base"))} (answers showing each, of n held-out prompts)</h4>'
            f'<table class="grid planted"><tr><th>behaviour</th><th>latents</th><th>unsteered</th>'
            f'<th title="the base continued from the chat model\'s residual at the crosscoder\'s block: the most steering there can do">'
            f'ceiling</th>{head}</tr>{"".join(body)}</table>')


def _behaviour_section(behaviour: tuple[list[dict[str, Any]], dict[str, Any]] | None, top: int = 10) -> str:
    """What changed, before any latent: the headline, then one row per prompt group with the
    group's top prompt and both answers (so every group, and what the chat model says in it,
    is on the first screen), then the histogram and the top prompts overall."""
    if behaviour is None:
        return ('<h2>What changed</h2><p class="muted">No behavioural diff in this run (a <code>[behaviour]</code> recipe '
                'table or <code>crossdiff behaviour</code> adds one: both models\' answers, ranked by KL).</p>')
    rows, summary = behaviour
    head = (f"<p>KL(chat &#8214; base) on the chat model's answer tokens, over {summary['prompts']:,} prompts: mean "
            f"<b>{_num(summary['kl_mean'])}</b> nats/token (95% CI {_num(summary['ci_low']) or '–'} to "
            f"{_num(summary['ci_high']) or '–'}), median prompt {_num(summary['median_prompt'])}. "
            "High KL: the base model would not have said what the chat model says.</p>")
    counts, edges = summary["histogram"]["counts"], summary["histogram"]["edges"]
    widest = max(counts) or 1
    bars = "".join(f'<div title="{edges[i]:.2f}-{edges[i + 1]:.2f}: {c} prompts" style="height:{100 * c / widest:.0f}%"></div>'
                   for i, c in enumerate(counts))
    histogram = (f'<figure class="behaviour-histogram"><div class="bars">{bars}</div><figcaption>prompts per KL bin, '
                 f'{edges[0]:.2f} to {edges[-1]:.2f} nats/token</figcaption></figure>')
    lines = "".join(f"<tr><td>{r['rank']}</td><td>{_num(r['kl_mean'])}</td><td>{_e(r.get('group') or '')}</td>"
                    f"<td>{_e(r['prompt'])}</td><td>{_e(r['chat_answer'])}</td>{_clipped(r['base_answer'])}</tr>"
                    for r in rows[:top])
    table = (f'<table class="grid behaviour-top"><tr><th>rank</th><th>KL</th><th>group</th><th>prompt</th>'
             f'<th>chat answer</th><th>base answer</th></tr>{lines}</table>')
    return (f'<h2>What changed: the behavioural diff</h2><div id="behaviour"><div class="behaviour-head">{head}{histogram}</div>'
            f'{_behaviour_groups(rows, summary)}<h4>Top {min(top, len(rows))} prompts by KL</h4>{table}'
            '<p class="muted">All prompts: <code>behaviour_diff.jsonl</code> in the run folder.</p></div>')


def _behaviour_groups(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """One row per prompt group (highest KL first): its KL with the interval, where its prompts
    rank among all prompts, and its top prompt with both models' answers."""
    groups = summary.get("groups") or {}
    if not groups:
        return ""
    body = []
    for name, g in sorted(groups.items(), key=lambda item: -item[1]["kl_mean"]):
        members = [r for r in rows if r.get("group") == name]
        ranks = sorted(r["rank"] for r in members)
        first = min(members, key=lambda r: r["rank"]) if members else None
        answer = (f"<td>{_e(first['prompt'])}</td><td class=\"chat-answer\">{_e(first['chat_answer'])}</td>"
                  f"{_clipped(first['base_answer'])}") if first else "<td></td><td></td><td></td>"
        body.append(f'<tr data-group="{_e(name)}"><th>{_e(name)}</th><td>{_num(g["kl_mean"])} [{_num(g["ci_low"]) or "–"}, '
                    f'{_num(g["ci_high"]) or "–"}]</td><td>{g["prompts"]:,}</td>'
                    f'<td>{g["best_rank"]} / {ranks[len(ranks) // 2] if ranks else "–"}</td>{answer}</tr>')
    return ('<table class="grid behaviour-groups"><tr><th>group</th><th>KL per token (95% CI)</th><th>prompts</th>'
            f'<th title="best and median rank of the group\'s prompts among all {len(rows):,} (1 = highest KL)">rank: best / '
            'median</th><th>its top prompt</th><th>chat answer</th><th>base answer</th></tr>'
            f'{"".join(body)}</table>')


def _clipped(text: str, limit: int = 90) -> str:
    """A table cell holding the start of ``text`` (the whole text on hover)."""
    short = text if len(text) <= limit else text[:limit].rstrip() + "\u2026"
    return f'<td class="base-answer" title="{_e(text)}">{_e(short)}</td>'


def _concepts_section(entries: list[tuple[str, Analysis, list[FigureFile]]], shown: int = 10) -> str:
    """The concepts of each crosscoder's findings.json (crossdiff.analysis.concepts), when the run has them."""
    cards = []
    for key, analysis, _ in entries:
        findings = analysis.findings
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
                        f"<td>{_num(lead['dnorm'], 2)}</td>{_verdict_cell(lead['verdict'])}<td><code>{_e(concept.get('context') or '')}</code></td>"
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
            f'<div class="columns stacked">{"".join(cards)}</div>')


def _verdict_counts(analysis: Analysis) -> str:
    """Latent Scaling's guarded verdicts on the found latents (the set the figures show), and,
    where the paper's flags count differently, how many and why."""
    table = analysis.table
    found = found_latents(table, analysis.summary, analysis.findings)
    verdict = verdicts(table).to_numpy()
    counts = {v: int((found.mask & (verdict == v)).sum()) for v in VERDICTS}
    rows = "".join(f"<tr>{_verdict_cell(v, 'th')}<td>{n:,}</td></tr>" for v, n in counts.items() if n)
    out = (f'<h4>Latent Scaling verdicts on the {_e(found.label)}</h4><table class="kv verdicts">{rows}</table>'
           f'{_flag_note(table, found.mask, verdict)}')
    co = analysis.summary.get("chat_only") or {}
    if co.get("with_twin"):
        out += f'<p class="muted small">{co["with_twin"]:,} chat-only latents have a base-only twin (a base latent writing the same direction).</p>'
    return out


def _flag_note(table: pd.DataFrame, mask: np.ndarray, verdict: np.ndarray) -> str:
    """The paper's flags (thresholds alone, on chat-only latents) against the guarded verdicts."""
    chat_only = mask & (table["tag"].astype(str) == "chat-only").to_numpy()
    if not chat_only.any() or "chat_specific" not in table.columns:
        return ""
    flagged = chat_only & table["chat_specific"].fillna(False).to_numpy(dtype=bool)
    specific = chat_only & (verdict == "chat-specific")
    differ = flagged & ~specific
    why = ", ".join(f"{int((differ & (verdict == v)).sum())} {v}" for v in dict.fromkeys(verdict[differ]))
    shrink = int((chat_only & table["complete_shrinkage"].fillna(False).to_numpy(dtype=bool)).sum())
    decouple = int((chat_only & table["latent_decoupling"].fillna(False).to_numpy(dtype=bool)).sum())
    text = (f"The paper's rule alone (its thresholds, no guards) flags {int(flagged.sum()):,} of the "
            f"{int(chat_only.sum()):,} chat-only latents chat-specific, {shrink:,} Complete Shrinkage and {decouple:,} "
            f"Latent Decoupling (a latent can be both).")
    if differ.any():
        text += (f" The verdict above counts {int(specific.sum()):,} chat-specific: it also checks each ratio's "
                 f"uncertainty and range, and of the flagged latents {why}.")
    return f'<p class="muted small flags">{_e(text)}</p>'


def _verdict_cell(verdict: Any, tag: str = "td") -> str:
    if not verdict:
        return f"<{tag}>–</{tag}>"
    return f'<{tag} title="{_e(MEANINGS.get(str(verdict), ""))}">{_e(verdict)}</{tag}>'


def _verdict_legend() -> str:
    """Every verdict's meaning, once."""
    rows = "".join(f"<tr><th>{_e(v)}</th><td>{_e(m)}</td></tr>" for v, m in MEANINGS.items())
    return ('<details class="verdict-legend" open><summary>What each Latent Scaling verdict means</summary>'
            '<p class="muted small">nu_error and nu_recon: how much of the latent\'s chat-model amount the base model '
            'has, by its error and by its reconstruction (docs/analysis.md). For a latent that is not chat-only the '
            f'decisions read the same way: the base model has this concept too.</p><table class="kv">{rows}</table></details>')


def _causal_section(entries: list[tuple[str, Analysis, list[FigureFile]]], out: Path) -> str:
    """The causal result as the paper draws it: the share of None's KL each condition closes."""
    cells, present = [], False
    for key, analysis, figures in entries:
        figure = next((f for f in figures if f.name == "closed"), None)
        if figure is None:
            cells.append(f'<div class="card causal" data-key="{key}"><h3>{_e(analysis.name)}</h3><p class="muted">Causal stage not '
                         'run (<code>crossdiff causal</code> adds it).</p></div>')
            continue
        present = True
        png, svg = figure.png.relative_to(out).as_posix(), figure.svg.relative_to(out).as_posix()
        cells.append(f'<div class="card causal" data-key="{key}"><h3>{_e(analysis.name)}</h3>'
                     f'<figure><img src="{png}" alt="share of None\'s KL closed, {_e(analysis.name)}">'
                     f'<figcaption><a href="{png}">PNG</a> &middot; <a href="{svg}">SVG</a></figcaption></figure>'
                     f'{_closed_table(analysis.kl)}{_kl_table(analysis.kl)}</div>')
    title, caption = FIGURE_TEXT["closed"]
    note = "" if present else '<p class="muted">No crosscoder has causal results yet.</p>'
    return (f'<h2 id="causal">{_e(title)}</h2><p class="muted">{_e(caption)}</p>{note}'
            f'<div class="columns">{"".join(cells)}</div>')


def _closed_table(kl: pd.DataFrame) -> str:
    """Share of None's KL closed, one row per condition, one column per token subset."""
    shares = closed_shares(kl)
    subsets = list(dict.fromkeys(shares["subset"].astype(str)))
    head = "".join(f"<th>{_e(s)}</th>" for s in subsets)
    rows = []
    for label, part in shares.groupby("label", sort=False):
        by = part.set_index(part["subset"].astype(str))
        cells = "".join(f"<td>{_pct(by.closed.get(s))} [{_pct(by.closed_low.get(s))}, {_pct(by.closed_high.get(s))}]</td>"
                        for s in subsets)
        rows.append(f"<tr><th>{_e(label)}</th>{cells}</tr>")
    return (f'<table class="grid closed"><tr><th>condition</th>{head}</tr>{"".join(rows)}</table>')


def _kl_table(kl: pd.DataFrame | None) -> str:
    """The raw KL table, folded: every number behind the figure."""
    if kl is None or not len(kl):
        return ""
    extra = [c for c in ("n_tokens", "n_latents") if c in kl.columns]
    head = "".join(f"<th>{c}</th>" for c in ["condition", "subset", "KL (95% CI)", *extra])
    rows = []
    for label, row in zip(condition_labels(kl), kl.itertuples(index=False)):
        cells = [_e(label), _e(row.subset),
                 f"{_num(row.kl_mean, 4) or '–'} [{_num(row.ci_low, 4) or '–'}, {_num(row.ci_high, 4) or '–'}]"]
        cells += [_e(_count(getattr(row, c)) or "–") for c in extra]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (f'<details><summary>KL per condition ({len(kl)} rows)</summary><table class="grid kl"><tr>{head}</tr>'
            f'{"".join(rows)}</table></details>')


def _figure_rows(entries: list[tuple[str, Analysis, list[FigureFile]]], out: Path) -> str:
    rows = []
    for name, (title, caption) in FIGURE_TEXT.items():
        if name == "closed":
            continue  # shown in the causal section
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


def _pct(value: Any) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{100 * value + 0.0:.0f}%".replace("-0%", "0%")


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
