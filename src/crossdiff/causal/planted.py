"""Steer each planted behaviour's latents into the base: does the crosscoder hold the behaviour?

On a model organism the behaviours are known, and a truth file says so (crossdiff.organism.truth;
RUN/data/truth.json on the SmolLM2 LoRA organism), with each behaviour's context patterns,
held-out prompts and ``expect`` pattern. For each behaviour this stage

1. finds its latents (``pick``):

   * ``anticipation`` (default): among the ``search`` most chat-leaning live latents, those
     whose top examples are mostly followed by the behaviour's words (a context pattern
     matches the window *after* the latent's own token): latents that fire where the chat
     model is about to show the behaviour, so their decoder direction is what makes it.
     A latent that fires *on* the words (after the model has shown the behaviour) reads
     it; steering with it mostly repeats the token it sits on (docs/real-pair.md);
   * ``answer-start``: the latents whose activation at the position that predicts the
     answer's first token is highest on the behaviour's contrast prompts against ordinary
     ones (:func:`crossdiff.causal.steer.answer_start_contrast`);

2. steers them together into the **base** on the behaviour's held-out prompts, at each
   factor, and counts the answers that show the behaviour (its ``expect`` pattern);
3. steers ``controls`` sets of random live latents of the same size the same way;
4. measures the *ceiling* (``ceiling = true``): the base continued from the chat model's
   whole residual after the crosscoder's block, on the same prompts. Steering at that
   block can at best do what the chat's own residual does there; a behaviour the ceiling
   does not show is made by later blocks, where no crosscoder at this layer can see or
   steer it (docs/real-pair.md measured this on an adapter trained on every block).

A behaviour is carried by its latents when the steered count is high and the controls'
is low. Rows go to ``planted/<behaviour>.jsonl`` in the crosscoder's causal folder, the
counts to ``planted/summary.json`` (written last: the stage is done when it exists).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossdiff.causal.config import STEER_HOW
from crossdiff.errors import CrossdiffError
from crossdiff.files import write_json_atomic
from crossdiff.organism.truth import Behaviour, Truth, load_truth
from crossdiff.terminal import latent_ids


PICKS = ("anticipation", "attribution", "answer-start")
SHOWN = 8  # latents named per behaviour in the printed summary (summary.json keeps them all)


@dataclass
class PlantedSteerConfig:
    """The recipe's ``[steer]`` table."""

    truth: str
    """The truth file (crossdiff.organism.truth): behaviours with contrast prompts, held-out prompts and an expect pattern."""
    latents: int = 1
    """Latents per behaviour, steered together (the best ``pick`` finds)."""
    pick: str = "anticipation"
    """How a behaviour's latents are found: anticipation (fire just before its words), attribution (the largest first-order
    effect on the chat's own answers to the contrast prompts) or answer-start (contrast of prompts)."""
    how: str = "direction"
    """How they are steered (crossdiff steer --how): direction (a constant vector) or activation (their own activations)."""
    search: int = 200
    """anticipation: how many of the most chat-leaning live latents are searched."""
    min_share: float = 0.5
    """anticipation: a latent anticipates a behaviour when at least this share of its top examples do."""
    min_dnorm: float = 0.5
    """answer-start: only latents at least this chat-leaning are candidates (a shared latent steers both models alike)."""
    factors: list[float] = field(default_factory=lambda: [1.0, 2.0])
    positions: str = "all"
    """Where the push is added: all (prompt and every generated token) or prompt (the prompt's positions only)."""
    controls: int = 5
    """Sets of random live latents steered the same way, per behaviour."""
    prompts: int = 10
    """Held-out prompts per behaviour."""
    max_new_tokens: int = 24
    seed: int = 0
    ceiling: bool = True
    """Also count the behaviour in the base continued from the chat's residual at the crosscoder's block."""
    crosscoders: list[str] | None = None
    """The recipe's crosscoders to steer with (default: all); activation steering costs minutes per behaviour on a CPU."""

    def __post_init__(self) -> None:
        if self.latents < 1:
            raise CrossdiffError("[steer] latents must be at least 1")
        if not self.factors:
            raise CrossdiffError("[steer] factors must name at least one factor")
        if self.pick not in PICKS:
            raise CrossdiffError(f"[steer] pick must be one of {', '.join(PICKS)}, got {self.pick!r}")
        if self.how not in STEER_HOW:
            raise CrossdiffError(f"[steer] how must be one of {', '.join(STEER_HOW)}, got {self.how!r}")
        if self.prompts < 1 or self.controls < 0:
            raise CrossdiffError("[steer] prompts must be at least 1 and controls 0 or more")


def steerable(truth: Truth, source: str, pick: str = "anticipation") -> list[Behaviour]:
    """The truth file's behaviours, each checked to carry what steering needs (one line if not)."""
    needs = {"anticipation": ("expect", "prompts", "patterns"), "attribution": ("expect", "prompts", "contrast_prompts")}.get(pick)
    if pick == "answer-start":
        needs = ("expect", "prompts", "contrast_prompts")
        if not truth.ordinary_prompts:
            raise CrossdiffError(f"truth file {source} has no 'ordinary_prompts' (the other side of each behaviour's contrast)")
    for behaviour in truth.behaviours:
        for key in needs:
            if not getattr(behaviour, key):
                raise CrossdiffError(f"truth file {source}: behaviour {behaviour.name!r} has no {key!r}, which steering needs")
    return truth.behaviours


def steer_planted(crosscoder_dir: str | Path, analysis_dir: str | Path, out: str | Path, config: PlantedSteerConfig,
                  pair: Any) -> dict[str, Any]:
    """Run the stage for one crosscoder; returns (and writes) the summary."""
    # deferred: these import torch; the recipe, so `crossdiff run --help`, imports this module for PlantedSteerConfig
    from crossdiff.causal.experiment import read_analysis
    from crossdiff.causal.steer import SteerConfig, match_counts, run_steer
    from crossdiff.crosscoder import CrossCoder

    truth = load_truth(config.truth)
    behaviours = steerable(truth, config.truth, config.pick)
    crosscoder = CrossCoder.from_pretrained(crosscoder_dir)
    table, _ = read_analysis(analysis_dir, crosscoder)
    dnorm = table.set_index("latent")["dnorm"]
    out = Path(out)
    results = []
    for behaviour in behaviours:
        found, score_name, why = _pick(config, behaviour, truth, crosscoder, table, Path(analysis_dir), pair)
        found = found.head(config.latents)
        if found.empty:
            raise CrossdiffError(f"behaviour {behaviour.name!r}: no live latent {why}; see [steer] in docs/causal.md")
        chosen = [int(j) for j in found["latent"]]
        rows = run_steer(SteerConfig(
            crosscoder=str(crosscoder_dir), analysis_dir=str(analysis_dir), latents=[",".join(map(str, chosen))],
            prompts=behaviour.prompts[: config.prompts], factors=list(config.factors), model="base", positions=config.positions,
            max_new_tokens=config.max_new_tokens, out=str(out / f"{behaviour.name}.jsonl"), how=config.how,
            expect=behaviour.expect, controls=config.controls, seed=config.seed), pair=pair)
        ceiling = None
        if config.ceiling:
            answers = ceiling_answers(pair, crosscoder.config.layer, behaviour.prompts[: config.prompts], config.max_new_tokens)
            ceiling = sum(bool(re.search(behaviour.expect, answer)) for answer in answers)
        counts = match_counts(rows)
        mine, controls = counts[~counts["control"]].iloc[0], counts[counts["control"]]
        n = int(mine["prompts"])
        results.append({
            "behaviour": behaviour.name, "latents": chosen,
            "pick": config.pick, "how": config.how, score_name: [round(float(c), 4) for c in found[score_name]],
            "dnorm": [round(float(dnorm[j]), 4) for j in chosen], "prompts": n,
            "unsteered": int(mine["unsteered"]), "ceiling": ceiling,
            "steered": {f"{f:g}": int(mine[f]) for f in config.factors},
            "controls": {f"{f:g}": [int(c) for c in controls[f]] for f in config.factors} if len(controls) else {},
        })
    summary = {"truth": str(config.truth), "model": "base", "how": config.how, "factors": list(config.factors),
               "controls": config.controls, "behaviours": results}
    write_json_atomic(out / "summary.json", summary)
    return summary


def _pick(config: PlantedSteerConfig, behaviour: Behaviour, truth: Truth, crosscoder: Any, table: Any, analysis_dir: Path,
          pair: Any) -> tuple[Any, str, str]:
    """The behaviour's candidate latents best first (a table with ``latent`` and the score column),
    the score column's name, and what a latent must do to be found (for the error when none is)."""
    if config.pick == "anticipation":
        found = anticipating_latents(analysis_dir, table, behaviour, search=config.search, min_share=config.min_share)
        return found, "share", (f"anticipates it (in at least {config.min_share:g} of its top examples) among the "
                                f"{config.search} most chat-leaning")
    if config.pick == "attribution":
        return attributed_latents(crosscoder, table, pair, behaviour, max_new_tokens=config.max_new_tokens), "attribution", \
            "raises the likelihood of the chat's answers to its contrast prompts"
    from crossdiff.causal.steer import answer_start_contrast  # deferred: imports torch, as in steer_planted

    candidates = table[~table["dead"] & (table["dnorm"] >= config.min_dnorm) & (table["max_act"] > 0)]
    found = answer_start_contrast(crosscoder, pair, behaviour.contrast_prompts, truth.ordinary_prompts)
    return found[found["latent"].isin(candidates["latent"])], "contrast", f"has dnorm >= {config.min_dnorm}"


def attributed_latents(crosscoder: Any, table: Any, pair: Any, behaviour: Behaviour, *, max_new_tokens: int) -> Any:
    """Live latents with a positive attribution to the chat's own answers to the behaviour's
    contrast prompts (crossdiff.causal.activation_steer), largest first: latent, attribution, dnorm."""
    # deferred: these import torch, as in steer_planted
    from crossdiff.causal.activation_steer import latent_attribution
    from crossdiff.causal.conditions import Conditions
    from crossdiff.causal.conversations import end_of_turn_ids

    conditions = Conditions(crosscoder, [], bos_token_id=pair.tokenizer.bos_token_id, special_token_ids=pair.tokenizer.all_special_ids)
    attribution = latent_attribution(pair, conditions, crosscoder.config.layer, behaviour.contrast_prompts,
                                     max_new_tokens=max_new_tokens, stop_ids=end_of_turn_ids(pair.tokenizer, pair.chat))
    live = table[~table["dead"] & (table["max_act"] > 0)].copy()
    live["attribution"] = attribution.cpu().numpy()[live["latent"].to_numpy()]
    live = live[live["attribution"] > 0]
    return live.sort_values(["attribution", "latent"], ascending=[False, True], kind="stable")[
        ["latent", "attribution", "dnorm"]].reset_index(drop=True)


def ceiling_answers(pair: Any, layer: int, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The base's greedy answers to ``prompts`` when its blocks after ``layer`` run on the chat
    model's residual there: one token at a time, each step re-running the chat's lower half on
    the whole sequence (no cache to get wrong; the prompts are few and short)."""
    import torch  # deferred: the recipe (and `crossdiff run --help`) imports this module's config without torch

    # deferred: these import torch, as in steer_planted
    from crossdiff.causal.conversations import end_of_turn_ids, user_prompt_ids
    from crossdiff.causal.upper import SplitModel

    base, chat = SplitModel(pair.base, layer), SplitModel(pair.chat, layer)
    stop, answers = set(end_of_turn_ids(pair.tokenizer, pair.chat)), []
    for prompt in prompts:
        answer = []
        ids = torch.tensor([user_prompt_ids(pair.tokenizer, prompt)])
        for _ in range(max_new_tokens):
            mask = torch.ones_like(ids)
            last = torch.zeros_like(ids, dtype=torch.bool)
            last[:, -1] = True
            with torch.inference_mode():
                token = int(base.upper(chat.lower(ids, mask), ids, mask, positions=last)[0].argmax())
            if token in stop:
                break
            answer.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        answers.append(pair.tokenizer.decode(answer, skip_special_tokens=True).strip())
    return answers


def anticipating_latents(analysis_dir: Path, table: Any, behaviour: Behaviour, *, search: int, min_share: float) -> Any:
    """The latents that anticipate ``behaviour``, best first: among the ``search`` most
    chat-leaning live latents, those for which at least ``min_share`` of the top examples
    are followed by the behaviour's words; a table of latent, share (of examples) and dnorm."""
    # deferred: pandas; the recipe imports this module, as in steer_planted
    import pandas as pd

    from crossdiff.analysis.read import AnalysisOutput  # deferred: imports pandas, as above

    live = table[~table["dead"] & table["dnorm"].notna() & (table["max_act"] > 0)]
    live = live.sort_values(["dnorm", "latent"], ascending=[False, True]).head(search)
    rows = []
    with AnalysisOutput(analysis_dir).example_store() as store:
        for latent, dnorm in zip(live["latent"], live["dnorm"]):
            share = anticipation_share(store.examples(int(latent), "top"), behaviour)
            if share >= min_share:
                rows.append({"latent": int(latent), "share": share, "dnorm": float(dnorm)})
    found = pd.DataFrame(rows, columns=["latent", "share", "dnorm"])
    return found.sort_values(["share", "dnorm", "latent"], ascending=[False, False, True], kind="stable").reset_index(drop=True)


def anticipation_share(examples: list[Any], behaviour: Behaviour) -> float:
    """Share of ``examples`` whose window after the example's own token shows ``behaviour``."""
    if not examples:
        return 0.0
    ahead = ["".join((example.tokens or [])[example.token_index + 1:]) for example in examples]
    return sum(behaviour.matches(text) for text in ahead) / len(examples)


def format_planted(summary: dict[str, Any]) -> str:
    """One line per behaviour: its latents, then steered and control hit counts per factor."""
    lines = [f"planted behaviours steered into the {summary['model']} (answers showing the behaviour, of n held-out prompts):"]
    for r in summary["behaviours"]:
        per_factor = "; ".join(
            f"x{f}: {r['steered'][f]}/{r['prompts']} vs controls max {max(r['controls'].get(f, []), default=0)}/{r['prompts']}"
            for f in r["steered"])
        ceiling = "" if r.get("ceiling") is None else f"; chat residual in the base {r['ceiling']}/{r['prompts']}"
        dnorms = r["dnorm"][:SHOWN]
        lines.append(f"  {r['behaviour']:18s} latents {latent_ids(r['latents'], SHOWN)} (dnorm "
                     f"{', '.join(f'{d:.2f}' for d in dnorms)}{', ...' if len(r['dnorm']) > SHOWN else ''}); unsteered {r['unsteered']}/{r['prompts']}{ceiling}; {per_factor}")
    return "\n".join(lines)
