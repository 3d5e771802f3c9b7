"""The end screen: what changed, at a glance, from the files a run (or an analysis) left.

`crossdiff analyze`, `run` and `demo` end with this screen, and `crossdiff inspect PATH
--summary` reprints it. It is built from files only (crossdiff.analysis.read), so it reads
the same whether the stages just ran or ran last week, and it says each thing once:

* the behavioural diff (``behaviour_diff.json``): how far the base is from the chat
  model's answers, per prompt group, and the prompt where it is farthest;
* one row of headline numbers per crosscoder (FVE, L0, dead latents and the chat-only
  verdict counts), all counts from the guarded ``verdict`` column; where the paper's
  unguarded flags (``summary.json``'s ``chat_only``) count differently, the line says
  by how much and which guard holds the difference;
* per crosscoder, its top concepts with one context each (``findings.json``), or without
  findings its top latents by the Latent Scaling rank-sum (``summary.json``);
* the causal headline in words (``causal/``: share of None's KL closed per condition)
  and the planted-behaviour steering when it ran;
* where to look next.

One crosscoder takes at most 40 lines, two at most 80 (tests/test_demo.py checks it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from crossdiff.analysis.read import CAUSAL_FILES, SUMMARY, AnalysisOutput, read_behaviour, run_outputs
from crossdiff.terminal import latent_ids, printable

SPARSITY = {"relu": "L1", "batchtopk": "BatchTopK", "topk": "TopK"}
DECISIONS = ("complete shrinkage", "latent decoupling", "shrinkage+decoupling")  # Latent Scaling rejects the latent
CONCEPTS = 5
WIDTH = 110  # characters of a quoted context or prompt


def summary_screen(path: str | Path, *, concepts: int = CONCEPTS) -> str:
    """The end screen of a run folder, a crosscoder folder or an analysis folder."""
    outputs = run_outputs(path)
    return end_screen(outputs, run_dir=outputs[0].run_dir(), concepts=concepts)


def run_screen(run_dir: str | Path, names: list[str]) -> str | None:
    """The end screen of a run's crosscoders ``names`` whose analysis finished; None if none has."""
    run_dir = Path(run_dir)
    outputs = [AnalysisOutput(run_dir / name) for name in names if (run_dir / name / "analysis" / SUMMARY).is_file()]
    return end_screen(outputs, run_dir=run_dir) if outputs else None


def end_screen(outputs: list[AnalysisOutput], *, run_dir: Path | None = None, concepts: int = CONCEPTS) -> str:
    """The screen for ``outputs`` (each a finished analysis), shared parts once."""
    lines = [f"what changed ({run_dir or outputs[0].folder}):"]
    behaviour = read_behaviour(run_dir) if run_dir is not None else None
    if behaviour is not None:
        lines += behaviour_lines(*behaviour)
    try:
        return "\n".join(lines + _crosscoder_parts(outputs, concepts) + [""] + next_lines(outputs, run_dir, behaviour is not None))
    finally:
        for output in outputs:
            output.close()  # the example stores top_context opened (reopened on demand)


def _crosscoder_parts(outputs: list[AnalysisOutput], concepts: int) -> list[str]:
    """The headline table, the causal baseline when shared, then each crosscoder's section."""
    tables = {output.name: output.table(explanations=False) for output in outputs}
    lines = headline_lines(outputs, tables)
    causal = {output.name: output.causal() for output in outputs}
    baselines = {tuple(none_line(*found)) for found in causal.values() if found is not None}
    if len(baselines) == 1:  # the same prompts and layer for every crosscoder: said once
        lines += list(next(iter(baselines)))
    for output in outputs:
        lines.append("")
        lines += crosscoder_lines(output, concepts=concepts)
        if causal[output.name] is not None:
            lines += (none_line(*causal[output.name]) if len(baselines) > 1 else []) + causal_headline(*causal[output.name])
        planted = output.planted()
        if planted:
            lines += planted_lines(planted)
    return lines


# ----------------------------------------------------------------------------- parts


def behaviour_lines(rows: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    """The behavioural diff in three lines: headline, groups, the farthest prompt."""
    lines = [f"behaviour: KL(chat || base) = {summary['kl_mean']:.2f} nats/token on the chat model's answers to {summary['prompts']} "
             f"prompts (95% CI {_num(summary.get('ci_low'), '.2f')}..{_num(summary.get('ci_high'), '.2f')})"]
    groups = sorted((summary.get("groups") or {}).items(), key=lambda item: -item[1]["kl_mean"])
    if groups:
        lines.append("  by prompt group, highest first: " + ", ".join(
            f"{printable(name)} {g['kl_mean']:.2f}" for name, g in groups[:8]) + (f" (+{len(groups) - 8} more)" if len(groups) > 8 else ""))
    if rows:
        top = rows[0]
        group = f"[{printable(top['group'])}] " if top.get("group") is not None else ""
        lines.append(f"  farthest ({top['kl_mean']:.2f}): {group}{_cut(top['prompt'], 40)} -> chat: {_cut(top['chat_answer'], 40)}"
                     f" | base: {_cut(top['base_answer'], 28)}")
    return lines


def headline_lines(outputs: list[AnalysisOutput], tables: dict[str, pd.DataFrame]) -> list[str]:
    """One row per crosscoder: quality, and the chat-only latents' guarded verdicts (the paper's comparison)."""
    width = max(4, *(len(output.name) for output in outputs))
    threshold = ((outputs[0].summary().get("config") or {}).get("tags") or {}).get("chat_only", 0.9)
    lines = [f"crosscoders: of the chat-only latents (dnorm > {threshold:g}), Latent Scaling confirms (chat-specific), "
             "rejects (shrinkage, decoupling) or leaves undecided (a guard)",
             f"  {'name':{width}s} {'kind':9s} {'FVE':>6s} {'L0':>6s} {'live':>11s} {'chat-only':>9s} {'confirmed':>9s} "
             f"{'rejected':>8s} {'undecided':>9s}  chat-specific at any dnorm"]
    notes = []
    for output in outputs:
        summary, table = output.summary(), tables[output.name]
        quality, counts = summary.get("quality") or {}, verdict_counts(table)
        kind = SPARSITY.get((summary.get("crosscoder") or {}).get("activation"), "?")
        lines.append(f"  {output.name:{width}s} {kind:9s} {_num(quality.get('fve'), '6.3f')} {_num(quality.get('l0'), '6.1f')} "
                     f"{len(table) - summary['dead']:>5d}/{len(table):<5d} {counts['chat_only']:9d} {counts['confirmed']:9d} "
                     f"{counts['rejected']:8d} {counts['undecided']:9d}  {counts['specific_any']}")
        note = unguarded_note(output.name, summary, table)
        if note:
            notes.append(note)
    return lines + notes


def verdict_counts(table: pd.DataFrame) -> dict[str, int]:
    """The headline counts, all from the guarded ``verdict`` column (crossdiff.analysis.verdicts)."""
    chat_only = table["tag"].astype(str) == "chat-only"
    verdict = table["verdict"].astype(str)
    live = ~table["dead"].astype(bool)
    return {"chat_only": int(chat_only.sum()),
            "confirmed": int((chat_only & (verdict == "chat-specific")).sum()),
            "rejected": int((chat_only & verdict.isin(DECISIONS)).sum()),
            "undecided": int((chat_only & live & ~verdict.isin(("chat-specific", *DECISIONS))).sum()),
            "specific_any": int((verdict == "chat-specific").sum())}


def unguarded_note(name: str, summary: dict[str, Any], table: pd.DataFrame) -> str | None:
    """Why the paper's flag count (summary.json, the report's "paper's flags") differs from the
    guarded count, or None when they agree."""
    flagged = table[(table["tag"].astype(str) == "chat-only") & table["chat_specific"].astype(bool)]
    held = flagged[flagged["verdict"].astype(str) != "chat-specific"]["verdict"].astype(str).value_counts()
    if held.empty:
        return None
    why = ", ".join(f"{verdict} {n}" for verdict, n in held.items())
    return (f"  {name}: the paper's unguarded rule (nu_error < 0.2 and nu_recon < 0.5, summary.json) confirms "
            f"{summary['chat_only']['chat_specific']}; {int(held.sum())} of them fail a guard here ({why})")


def crosscoder_lines(output: AnalysisOutput, *, concepts: int = CONCEPTS) -> list[str]:
    """What the crosscoder was analysed on, then its concepts (or without findings.json its top latents)."""
    summary = output.summary()
    tags = summary.get("tags") or {}
    lines = [f"{output.name}: {summary.get('n_tokens', 0):,} tokens analysed; tags (by dnorm): "
             + ", ".join(f"{tag} {n}" for tag, n in tags.items())]
    if (summary.get("left_out") or {}).get("left_out"):
        from crossdiff.cache.store import LeftOut  # torch: only for an analysis that left tokens out

        lines.append("  " + LeftOut.from_dict(summary["left_out"]).line())
    findings = output.findings()
    return lines + (concept_lines(output, findings, concepts) if findings else top_latent_lines(output, concepts))


def concept_lines(output: AnalysisOutput, findings: dict[str, Any], shown: int) -> list[str]:
    """Up to ``shown`` concepts, two lines each: members and verdicts, then the lead latent's top context."""
    lines = [f"  {len(findings['concepts'])} concepts in its top {len(findings['latents'])} of the "
             f"{findings['pool']} most chat-leaning latents (findings.json), best first:"]
    by_latent = {entry["latent"]: entry for entry in findings["latents"]}
    for concept in findings["concepts"][:shown]:
        lead = by_latent[concept["lead"]]
        what = "the chat template" if concept.get("kind") == "chat template" else \
            (f"[{printable(concept['group'])}]" if concept.get("group") else "(no prompt group)")
        verdicts = ", ".join(f"{v} {n}" for v, n in concept["verdicts"].items())
        promotes = " ".join(repr(t) for t in concept.get("promotes_chat", [])[:3])
        lines.append(f"  {concept['concept']:2d} {what}: latents {latent_ids(concept['latents'])} (lead {lead['latent']}, "
                     f"dnorm {lead['dnorm']:.2f}; verdicts: {verdicts})")
        lines.append(f"       {_cut(concept.get('context') or '(no example)', WIDTH)}"
                     + (f"  promotes {_cut(promotes, 40)}" if promotes else ""))
    if len(findings["concepts"]) > shown:
        lines.append(f"  ... {len(findings['concepts']) - shown} more concepts: crossdiff inspect {output.crosscoder_dir} --findings")
    return lines


def top_latent_lines(output: AnalysisOutput, shown: int) -> list[str]:
    """Without findings.json: the dnorm distribution in one line, then the top chat-leaning latents
    by the Latent Scaling rank-sum, or by dnorm when no chat-leaning latent has a decided verdict."""
    found = output.summary().get("findings") or {}
    quantiles = (found.get("dnorm") or {}).get("quantiles") or {}
    rows, order = found.get("top_by_rank_sum") or [], "Latent Scaling rank-sum (low = most chat-specific)"
    if not rows:
        rows, order = found.get("top_by_dnorm") or [], "dnorm (no chat-leaning latent has a decided verdict)"
    lines = [f"  dnorm of live latents (1 = chat-only): median {_num(quantiles.get('0.5'), '.2f')}, "
             f"95% {_num(quantiles.get('0.95'), '.2f')}, 99% {_num(quantiles.get('0.99'), '.2f')}, max {_num(quantiles.get('1'), '.2f')}; "
             f"top chat-leaning latents by {order}:"]
    for row in rows[:shown]:
        context = row.get("context") or output.top_context(int(row["latent"])) or "(no example)"
        lines.append(f"  latent {row['latent']:6d}  dnorm {row['dnorm']:.2f}  {row.get('verdict', '-'):15s} "
                     f"nu_error {_num(row.get('nu_error'), '+.2f')}  nu_recon {_num(row.get('nu_recon'), '+.2f')}  {_cut(context, WIDTH - 40)}")
    if not rows:
        lines.append("  (none: no live latent leans to the chat model)")
    return lines


def none_line(kl: pd.DataFrame, summary: dict[str, Any]) -> list[str]:
    """The KL experiment's baseline (None), which every share in :func:`causal_headline` is of."""
    none = kl[(kl["subset"] == "all") & (kl["condition"] == "None")]["kl_mean"]
    return [f"causal: with the base residual at layer {summary['layer']}, the chat model's upper half is "
            f"{_num(float(none.iloc[0]) if len(none) else None, '.2f')} nats/token from the chat model on its "
            f"{summary['n_conversations']} answers (None); each crosscoder's patches close a share of that:"]


def causal_headline(kl: pd.DataFrame, summary: dict[str, Any]) -> list[str]:
    """The KL experiment in words: the share of None's KL each condition closes, on all assistant tokens."""
    closed = {}
    for row in kl[kl["subset"] == "all"].itertuples():
        form = row.form if isinstance(row.form, str) else ""
        closed[(row.condition, form)] = row.closed

    def share(condition: str, form: str = "") -> str:
        value = closed.get((condition, form), math.nan)
        return "n/a" if value is None or value != value else f"{value:.0%}"

    size = summary.get("sets", {}).get("ls-best")
    half = f"{len(size)} " if size else ""
    lines = [f"  causal: every latent's chat-minus-base decoder part added to the base closes {share('All')} of None's KL; "
             f"the chat error alone {share('eps_chat')}, the chat-template positions {share('template')}"]
    if ("ls-best", "replace") in closed:
        pool = summary["pool"]
        # The pool is not the chat-only count above: it keeps those whose ratios the paper's halves can rank.
        why = "chat-only, both nu in [-0.1, 2]" if pool["rule"] == "chat-only" else "the most chat-leaning; too few are chat-only"
        lines.append(f"     of {pool['size']} pool latents ({why}): {half}best by Latent Scaling "
                     f"{share('ls-best', 'replace')} (worst {share('ls-worst', 'replace')}), {half}top by dnorm {share('dnorm-top', 'replace')} "
                     f"(bottom {share('dnorm-bottom', 'replace')}), {half}random {share('random', 'replace')}")
    return lines


def causal_screen(kl: pd.DataFrame, summary: dict[str, Any], folder: Path) -> str:
    """What `crossdiff causal` ends with: the KL table, its headline in words, where it is saved."""
    analysis = summary.get("analysis_dir")
    return "\n".join([summary["text"], "", *none_line(kl, summary), *causal_headline(kl, summary),
                      f"saved in {folder}: {', '.join(CAUSAL_FILES.values())}",
                      f"next: crossdiff inspect {analysis} --summary (with the analysis); crossdiff report on the run folder"])


def planted_lines(planted: dict[str, Any]) -> list[str]:
    """Each planted behaviour steered into the base: best factor's hits against the controls."""
    lines = []
    for r in planted.get("behaviours", []):
        if not r.get("steered"):
            continue
        factor = max(r["steered"], key=lambda f: r["steered"][f])
        controls = max(r.get("controls", {}).get(factor, []), default=0)
        ceiling = "" if r.get("ceiling") is None else f", chat residual {r['ceiling']}/{r['prompts']}"
        lines.append(f"  steer {printable(r['behaviour'])}: latents {latent_ids(r['latents'])} at x{factor} make {r['steered'][factor]}/"
                     f"{r['prompts']} base answers show it (controls {controls}, unsteered {r['unsteered']}{ceiling})")
    return lines


def next_lines(outputs: list[AnalysisOutput], run_dir: Path | None, behaviour: bool) -> list[str]:
    first = outputs[0]
    lead = _lead_latent(first)
    where = run_dir if run_dir is not None and len(outputs) > 1 else first.crosscoder_dir
    lines = [f"next: crossdiff inspect {first.crosscoder_dir} --latent {lead}   (its examples; also --token WORD, --search TEXT)",
             f"      crossdiff inspect {where} --summary   (this screen again)"]
    if behaviour and run_dir is not None:
        lines.append(f"      crossdiff behaviour {run_dir}   (every prompt with both answers)")
    crosscoder = first.crosscoder_dir / "crosscoder"
    if crosscoder.is_dir():
        lines.append(f"      crossdiff steer {crosscoder} {first.folder} --latent {lead} --prompt '...'   (does it cause the behaviour?)")
    report = (run_dir / "report" / "index.html") if run_dir is not None else None
    if report is not None and report.is_file():
        lines.append(f"report: {report}  (open it in a browser; no server needed)")
    return lines


# ----------------------------------------------------------------------------- helpers


def _lead_latent(output: AnalysisOutput) -> int:
    findings = output.findings()
    if findings and findings.get("concepts"):
        return int(findings["concepts"][0]["lead"])
    found = output.summary().get("findings") or {}
    rows = found.get("top_by_rank_sum") or found.get("top_by_dnorm") or []  # as top_latent_lines shows them
    return int(rows[0]["latent"]) if rows else 0


def _cut(text: Any, width: int) -> str:
    text = printable(" ".join(str(text).split()))
    return text if len(text) <= width else text[:width - 1] + "…"


def _num(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a".rjust(len(format(0.0, spec)))
    return format(value, spec)
