"""Did steering make the base show a planted behaviour? (for `crossdiff score`)

Two kinds of steering results are read:

* a crosscoder's planted-steering stage (crossdiff.causal.planted, the recipe's ``[steer]``
  table): ``causal/planted/summary.json``, one entry per behaviour with the latents steered
  together, the answers matching the behaviour's ``expect`` pattern unsteered and at each
  factor, and the same counts for random control latent sets;
* the activation-difference baseline's ``adl_steering.jsonl`` (crossdiff.analysis.adl): one
  row per steering vector (a position's mean difference, or a random control direction),
  model, prompt and factor, with the answers' text. Each behaviour's ``expect`` pattern is
  matched here against the answers again, so one ADL run with any (or no) ``--expect`` is
  graded for every behaviour. Rows on the base model only; on the behaviour's held-out
  prompts where the run asked them, else on every prompt it asked.

A behaviour's steering **succeeds** when, at some factor, more than half of the prompts'
steered answers show it and more than show it unsteered or under any control at that
factor (:func:`succeeded`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from crossdiff.organism.truth import Behaviour, Truth

MOST = 0.5
"""More than this share: "most" (of the prompts here, of a finding's contexts in crossdiff.organism.score)."""


def succeeded(steered: dict[str, int], controls: dict[str, list[int]], unsteered: int, prompts: int) -> dict[str, Any]:
    """The best factor's counts and whether they beat the rule above; ``steered`` and
    ``controls`` are keyed by factor (as planted/summary.json writes them)."""
    best = None
    for factor, count in steered.items():
        others = controls.get(factor) or []
        beaten = max(others) if others else None
        wins = count > MOST * prompts and count > unsteered and (beaten is None or count > beaten)
        key = (wins, count)
        if best is None or key > best[0]:
            best = (key, {"factor": factor, "steered": count, "controls_max": beaten, "unsteered": unsteered,
                          "prompts": prompts, "success": wins})
    return best[1] if best else {"factor": None, "steered": 0, "controls_max": None, "unsteered": unsteered,
                                 "prompts": prompts, "success": False}


def planted_success(summary_path: Path, truth: Truth) -> dict[str, dict[str, Any]]:
    """Per behaviour of ``truth`` that the planted-steering stage steered: its latents and
    :func:`succeeded`'s record; behaviours it did not steer are left out."""
    if not summary_path.is_file():
        return {}
    summary = json.loads(summary_path.read_text())
    names = {b.name for b in truth.behaviours}
    result = {}
    for entry in summary.get("behaviours", []):
        if entry["behaviour"] in names:
            record = succeeded(entry["steered"], entry.get("controls") or {}, entry["unsteered"], entry["prompts"])
            result[entry["behaviour"]] = {"by": [int(j) for j in entry["latents"]], **record}
    return result


def adl_success(rows: list[dict[str, Any]], truth: Truth) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """From ADL steering rows: per behaviour, the best steering vector's record (vectors that
    succeed first, then more matching answers); and per vector, the behaviours it succeeds at."""
    base = [row for row in rows if row.get("model") == "base"]
    best: dict[str, dict[str, Any]] = {}
    shows: dict[str, list[str]] = {}
    for behaviour in truth.behaviours:
        if not behaviour.expect:
            continue
        for vector, record in _vector_counts(_on_prompts(base, behaviour), behaviour).items():
            if record["success"]:
                shows.setdefault(vector, []).append(behaviour.name)
            current = best.get(behaviour.name)
            if current is None or (record["success"], record["steered"]) > (current["success"], current["steered"]):
                best[behaviour.name] = {"by": vector, **record}
    return best, shows


def _on_prompts(rows: list[dict[str, Any]], behaviour: Behaviour) -> list[dict[str, Any]]:
    held_out = set(behaviour.prompts)
    mine = [row for row in rows if row["prompt"] in held_out]
    return mine or rows


def _vector_counts(rows: list[dict[str, Any]], behaviour: Behaviour) -> dict[str, dict[str, Any]]:
    """Per non-control steering vector: :func:`succeeded` on its counts of answers matching
    the behaviour's expect pattern, against the control directions' counts."""
    pattern = re.compile(behaviour.expect)
    steered: dict[str, dict[str, int]] = {}
    unsteered: dict[str, dict[str, bool]] = {}
    controls: dict[str, list[int]] = {}
    for row in rows:
        factor = f"{row['factor']:g}"
        name = row["latent"].split(": ", 1)[-1]  # "base: pos 2" -> "pos 2"
        counts = steered.setdefault(name, {})
        counts[factor] = counts.get(factor, 0) + bool(pattern.search(row["steered"]))
        unsteered.setdefault(name, {})[row["prompt"]] = bool(pattern.search(row["unsteered"]))
        if row.get("control"):
            controls.setdefault(name, [])
    control_counts = {f: [steered[name].get(f, 0) for name in controls] for f in {f for c in steered.values() for f in c}}
    return {name: succeeded(counts, control_counts if controls else {}, sum(unsteered[name].values()), len(unsteered[name]))
            for name, counts in steered.items() if name not in controls}
