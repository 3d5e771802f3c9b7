"""Steer each planted behaviour's latents into the base: does the crosscoder hold the behaviour?

On a model organism the behaviours are known, and a truth file says so (crossdiff.organism.truth;
RUN/data/truth.json on the SmolLM2 LoRA organism), with each behaviour's contrast and
held-out prompts and its ``expect`` pattern. For each behaviour this stage

1. finds its latents: among live chat-leaning latents (dnorm >= ``min_dnorm``), the
   ``latents`` whose activation where the models start answering exceeds most that on
   ordinary prompts (:func:`crossdiff.causal.steer.answer_start_contrast`); a behaviour
   carried by its answer's own words may have no such latent (docs/real-pair.md: on the
   SmolLM2 organism this picks a generic answer-start latent);
2. steers them together into the **base** on the behaviour's held-out prompts, at each
   factor, and counts the answers that show the behaviour (its ``expect`` pattern);
3. steers ``controls`` sets of random live latents of the same size the same way.

A behaviour is carried by its latents when the steered count is high and the controls'
is low. Rows go to ``planted/<behaviour>.jsonl`` in the crosscoder's causal folder, the
counts to ``planted/summary.json`` (written last: the stage is done when it exists).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossdiff.errors import CrossdiffError
from crossdiff.files import write_json_atomic
from crossdiff.organism.truth import Behaviour, Truth, load_truth


@dataclass
class PlantedSteerConfig:
    """The recipe's ``[steer]`` table."""

    truth: str
    """The truth file (crossdiff.organism.truth): behaviours with contrast prompts, held-out prompts and an expect pattern."""
    latents: int = 1
    """Latents per behaviour, steered together (the top ones by answer-start contrast)."""
    min_dnorm: float = 0.5
    """Only latents at least this chat-leaning are candidates (a shared latent steers both models alike)."""
    factors: list[float] = field(default_factory=lambda: [1.0, 2.0])
    controls: int = 5
    """Sets of random live latents steered the same way, per behaviour."""
    prompts: int = 10
    """Held-out prompts per behaviour."""
    max_new_tokens: int = 24
    seed: int = 0

    def __post_init__(self) -> None:
        if self.latents < 1:
            raise CrossdiffError("[steer] latents must be at least 1")
        if not self.factors:
            raise CrossdiffError("[steer] factors must name at least one factor")
        if self.prompts < 1 or self.controls < 0:
            raise CrossdiffError("[steer] prompts must be at least 1 and controls 0 or more")


def steerable(truth: Truth, source: str) -> list[Behaviour]:
    """The truth file's behaviours, each checked to carry what steering needs (one line if not)."""
    if not truth.ordinary_prompts:
        raise CrossdiffError(f"truth file {source} has no 'ordinary_prompts' (the other side of each behaviour's contrast)")
    for behaviour in truth.behaviours:
        for key in ("expect", "contrast_prompts", "prompts"):
            if not getattr(behaviour, key):
                raise CrossdiffError(f"truth file {source}: behaviour {behaviour.name!r} has no {key!r}, which steering needs")
    return truth.behaviours


def steer_planted(crosscoder_dir: str | Path, analysis_dir: str | Path, out: str | Path, config: PlantedSteerConfig,
                  pair: Any) -> dict[str, Any]:
    """Run the stage for one crosscoder; returns (and writes) the summary."""
    from crossdiff.causal.experiment import read_analysis
    from crossdiff.causal.steer import SteerConfig, answer_start_contrast, match_counts, run_steer
    from crossdiff.crosscoder import CrossCoder

    truth = load_truth(config.truth)
    behaviours = steerable(truth, config.truth)
    crosscoder = CrossCoder.from_pretrained(crosscoder_dir)
    table, _ = read_analysis(analysis_dir, crosscoder)
    candidates = table[~table["dead"] & (table["dnorm"] >= config.min_dnorm) & (table["max_act"] > 0)]
    dnorm = table.set_index("latent")["dnorm"]
    out = Path(out)
    results = []
    for behaviour in behaviours:
        contrast = answer_start_contrast(crosscoder, pair, behaviour.contrast_prompts, truth.ordinary_prompts)
        contrast = contrast[contrast["latent"].isin(candidates["latent"])].head(config.latents)
        if contrast.empty:
            raise CrossdiffError(f"no live latent has dnorm >= {config.min_dnorm}; lower [steer] min_dnorm")
        chosen = [int(j) for j in contrast["latent"]]
        rows = run_steer(SteerConfig(
            crosscoder=str(crosscoder_dir), analysis_dir=str(analysis_dir), latents=[",".join(map(str, chosen))],
            prompts=behaviour.prompts[: config.prompts], factors=list(config.factors), model="base",
            max_new_tokens=config.max_new_tokens, out=str(out / f"{behaviour.name}.jsonl"),
            expect=behaviour.expect, controls=config.controls, seed=config.seed), pair=pair, quiet=True)
        counts = match_counts(rows)
        mine, controls = counts[~counts["control"]].iloc[0], counts[counts["control"]]
        n = int(mine["prompts"])
        results.append({
            "behaviour": behaviour.name, "latents": chosen,
            "contrast": [round(float(c), 4) for c in contrast["contrast"]],
            "dnorm": [round(float(dnorm[j]), 4) for j in chosen], "prompts": n,
            "unsteered": int(mine["unsteered"]),
            "steered": {f"{f:g}": int(mine[f]) for f in config.factors},
            "controls": {f"{f:g}": [int(c) for c in controls[f]] for f in config.factors} if len(controls) else {},
        })
    summary = {"truth": str(config.truth), "model": "base", "factors": list(config.factors),
               "controls": config.controls, "behaviours": results}
    write_json_atomic(out / "summary.json", summary)
    return summary


def format_planted(summary: dict[str, Any]) -> str:
    """One line per behaviour: its latents, then steered and control hit counts per factor."""
    lines = [f"planted behaviours steered into the {summary['model']} (answers showing the behaviour, of n held-out prompts):"]
    for r in summary["behaviours"]:
        per_factor = "; ".join(
            f"x{f}: {r['steered'][f]}/{r['prompts']} vs controls max {max(r['controls'][f], default=0)}/{r['prompts']}"
            for f in r["steered"])
        lines.append(f"  {r['behaviour']:18s} latents {','.join(map(str, r['latents']))} (dnorm "
                     f"{', '.join(f'{d:.2f}' for d in r['dnorm'])}); unsteered {r['unsteered']}/{r['prompts']}; {per_factor}")
    return "\n".join(lines)
