"""`explain`: explanations and detection scores for the chosen latents of one analysis.

Steps, all through one cached client (so a rerun after a kill sends only what is missing):

1. choose latents: the ones asked for, else the chat-only latents Latent Scaling
   confirms, then the most chat-leaning live latents (by dnorm), under ``max_latents`` and
   a token budget (estimated from prompt lengths, 4 characters per token);
2. explain each from its explainer excerpts (:mod:`crossdiff.autointerp.samples`);
3. score three explanations per latent by detection on the same held-out batch: the
   LLM's, the latent's top tokens (LLM-free) and another latent's LLM explanation
   (shuffled, a seeded derangement): a score that does not beat the shuffled baseline
   says the explanation is not specific to its latent;
4. write ``explanations.parquet`` (one row per latent, joined to ``latents.parquet`` on
   ``latent``) and ``autointerp.json`` (settings, counts, group comparison).

Nothing depends on timing or on which requests were cached: given the same completions
the outputs are the same bytes.
"""

from __future__ import annotations

import json
import math
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from crossdiff.analysis.read import AnalysisOutput
from crossdiff.analysis.table import EXPLANATIONS_FILE
from crossdiff.autointerp import prompts
from crossdiff.autointerp.config import ExplainConfig, SampleConfig  # noqa: F401 (re-exported)
from crossdiff.autointerp.clients import ChatRequest, Client
from crossdiff.autointerp.metrics import detection_scores, roc_auc
from crossdiff.autointerp.samples import LatentSamples, ScoreItem, latent_samples, top_tokens_explanation
from crossdiff.errors import CrossdiffError
from crossdiff.files import jsonable, remove_stray_temporaries, write_atomic
from crossdiff.locks import output_lock

SUMMARY_FILE = "autointerp.json"
KINDS = {"llm": "detection", "top_tokens": "top_tokens_detection", "shuffled": "shuffled_detection"}
"""Explanation kind -> column prefix of its detection scores."""
SCORES = ("accuracy", "balanced_accuracy", "f1", "auc", "parse_failures")

COLUMNS: dict[str, str] = {
    "latent": "latent index (join key with latents.parquet)",
    "explanation": "the LLM's explanation (null if it abstained or answered nothing usable)",
    "abstained": f"the explainer answered {prompts.ABSTAIN!r}",
    "explanation_failed": "the explainer's answer held no usable explanation",
    "top_tokens_explanation": "LLM-free baseline: the latent's most frequent active tokens",
    "shuffled_from": "latent whose LLM explanation is this row's shuffled baseline (-1 if none)",
    "detection_<score>": "detection by the LLM's explanation: accuracy, balanced_accuracy, f1, auc (from "
                         "log-probabilities, null without them), parse_failures (scorer answers that were not a 0/1 "
                         "list; their excerpts are left out of the scores)",
    "top_tokens_detection_<score>": "the same for the top-tokens baseline",
    "shuffled_detection_<score>": "the same for the shuffled baseline",
    "n_explain": "excerpts the explainer saw",
    "n_score_activating": "held-out activating excerpts in the detection batch",
    "n_score_similar": "non-activating spans of the latent's own windows in the batch",
    "n_score_random": "excerpts of other latents' examples in the batch (assumed non-activating)",
    "random_active_risk": "freq x excerpt length: rough chance that a random excerpt is in fact active",
    "explainer_model": "model id of the explainer",
    "scorer_model": "model id of the detection scorer",
    "prompt_version": "version of the prompts",
}


@dataclass
class ExplainResult:
    table: pd.DataFrame
    summary: dict[str, Any]
    files: dict[str, Path]


def explain(analysis_dir: str | Path, client: Client, config: ExplainConfig = ExplainConfig(), *,
            scorer: Client | None = None, progress: bool = False) -> ExplainResult:
    """Explain and score latents of ``analysis_dir``; ``scorer`` defaults to ``client``."""
    if config.max_latents <= 0 or config.max_tokens <= 0:
        raise CrossdiffError(f"the budget must be positive (max_latents {config.max_latents}, max_tokens {config.max_tokens})")
    output = AnalysisOutput(analysis_dir)
    output.require_examples("explain needs examples (analyze without --no-examples)")
    # One writer per analysis folder: explain adds files to it, analyze replaces it whole.
    with output_lock(output.folder, "explain"):
        for name in (EXPLANATIONS_FILE, SUMMARY_FILE):
            remove_stray_temporaries(output.folder, name)  # what a killed explain left
        return _explain(output, client, scorer or client, config, progress)


def _explain(output: AnalysisOutput, client: Client, scorer: Client, config: ExplainConfig, progress: bool) -> ExplainResult:
    analysis_dir, examples_path = output.folder, output.require_examples()
    latents = output.table(explanations=False)
    with output.example_store() as store:
        if not store.vocab:
            raise CrossdiffError(f"{examples_path} has no token texts (analyze found no tokenizer; rerun it with --tokenizer)")
        chosen = _choose(latents, store, config)
    if not chosen:
        raise CrossdiffError(f"no latent of {analysis_dir} has enough examples to explain and score")

    run = _Runner(client, scorer, config)
    run.progress = progress
    explained = run.map(lambda s: _parse_explanation(client.complete(run.explain_request(s)), s), chosen, "explain")

    llm_text = {s.latent: text for s, (text, _, _) in zip(chosen, explained)}
    shuffled_from = _derangement([s.latent for s in chosen if llm_text[s.latent]], config.seed)
    jobs = []  # one per (latent, explanation kind, batch of excerpts)
    for s in chosen:
        candidates = {"llm": llm_text[s.latent], "top_tokens": top_tokens_explanation(s.top_tokens),
                      "shuffled": llm_text.get(shuffled_from.get(s.latent, -1))}
        jobs += [(s, kind, text, batch) for kind, text in candidates.items() if text for batch in run.batches(s)]
    answers = run.map(lambda job: _answer(scorer.complete(run.detect_request(job[2], job[3])), job[3]), jobs, "score")
    scores: dict[tuple[int, str], dict[str, Any]] = {}
    for (s, kind, _, _), answer in zip(jobs, answers):
        scores.setdefault((s.latent, kind), []).append(answer)
    scores = {key: _scores(parts) for key, parts in scores.items()}

    freq = latents.set_index("latent")["freq"]
    width = config.samples.before + 1 + config.samples.after
    rows = []
    for s, (text, abstained, failed) in zip(chosen, explained):
        row = {"latent": s.latent, "explanation": text, "abstained": abstained, "explanation_failed": failed,
               "top_tokens_explanation": top_tokens_explanation(s.top_tokens),
               "shuffled_from": shuffled_from.get(s.latent, -1)}
        for kind, prefix in KINDS.items():
            result = scores.get((s.latent, kind), {})
            for score in SCORES:
                row[f"{prefix}_{score}"] = result.get(score, math.nan if score != "parse_failures" else 0)
        row.update(
            n_explain=len(s.explain),
            n_score_activating=sum(i.kind == "activating" for i in s.score),
            n_score_similar=sum(i.kind == "similar" for i in s.score),
            n_score_random=sum(i.kind == "random" for i in s.score),
            random_active_risk=float(min(1.0, freq.get(s.latent, math.nan) * width)),
            explainer_model=client.model_id, scorer_model=scorer.model_id, prompt_version=prompts.PROMPT_VERSION,
        )
        rows.append(row)
    table = pd.DataFrame(rows)
    summary = {
        "explainer_model": client.model_id, "scorer_model": scorer.model_id, "prompt_version": prompts.PROMPT_VERSION,
        "config": asdict(config), "latents": len(table),
        "abstained": int(table["abstained"].sum()), "explanation_failed": int(table["explanation_failed"].sum()),
        "detection_parse_failures": {kind: int(table[f"{prefix}_parse_failures"].sum()) for kind, prefix in KINDS.items()},
        "groups": compare_groups(latents.merge(table, on="latent")),
        "columns": COLUMNS,
    }
    files = {"explanations": analysis_dir / EXPLANATIONS_FILE, "summary": analysis_dir / SUMMARY_FILE}
    write_atomic(files["explanations"], lambda path: table.to_parquet(path, index=False))
    write_atomic(files["summary"], lambda path: Path(path).write_text(json.dumps(jsonable(summary), indent=2) + "\n"))
    return ExplainResult(table, summary, files)


def load_explained(analysis_dir: str | Path) -> pd.DataFrame:
    """``latents.parquet`` with the explanation columns joined in (rows of unexplained
    latents have nulls there)."""
    output = AnalysisOutput(analysis_dir)
    if not (output.folder / EXPLANATIONS_FILE).is_file():
        raise CrossdiffError(f"no {EXPLANATIONS_FILE} in {output.folder}: run crossdiff explain first")
    return output.table()


def group_masks(table: pd.DataFrame) -> dict[str, pd.Series]:
    """The paper's groups among explained latents: chat-only latents Latent Scaling confirms
    or rejects, and the other (chat-leaning) latents."""
    chat_only = table["tag"] == "chat-only"
    specific = table["chat_specific"].fillna(False).astype(bool)
    return {"confirmed chat-only": chat_only & specific, "rejected chat-only": chat_only & ~specific,
            "other": ~chat_only}


def compare_groups(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per group: latents, abstention rate and mean detection scores of each explanation kind."""
    out = {}
    for name, mask in group_masks(table).items():
        group = table[mask]
        entry: dict[str, float] = {"latents": int(len(group))}
        if len(group):
            entry["abstention_rate"] = float(group["abstained"].mean())
            for kind, prefix in KINDS.items():
                for score in ("balanced_accuracy", "auc"):
                    entry[f"{kind}_{score}"] = _nanmean(group[f"{prefix}_{score}"])
        out[name] = entry
    return out


def format_groups(name: str, summary: dict[str, Any]) -> str:
    lines = [f"{name}: {summary['latents']} latents explained by {summary['explainer_model']} "
             f"({summary['abstained']} abstained, {summary['explanation_failed']} unusable; detection parse failures "
             + ", ".join(f"{k} {v}" for k, v in summary["detection_parse_failures"].items()) + ")",
             f"  {'group':20s} {'n':>3s}  balanced accuracy (AUC): {'llm':>13s} {'top tokens':>13s} {'shuffled':>13s}"]
    for group, entry in summary["groups"].items():
        if not entry["latents"]:
            continue
        cells = [f"{_num(entry[f'{k}_balanced_accuracy'])} ({_num(entry[f'{k}_auc'])})" for k in KINDS]
        lines.append(f"  {group:20s} {entry['latents']:3d}  {'':25s} " + " ".join(f"{c:>13s}" for c in cells))
    return "\n".join(lines)


# ------------------------------------------------------------------ internals


class _Runner:
    """Builds the requests and runs them with the client's concurrency limit."""

    def __init__(self, client: Client, scorer: Client, config: ExplainConfig):
        self.client, self.scorer, self.config = client, scorer, config

    def explain_request(self, s: LatentSamples) -> ChatRequest:
        return ChatRequest(prompts.explainer_messages(s.explain), self.config.explain_max_tokens)

    def batches(self, s: LatentSamples) -> list[list[ScoreItem]]:
        size = self.config.detection_batch or len(s.score)
        return [s.score[i:i + size] for i in range(0, len(s.score), size)]

    def detect_request(self, explanation: str, batch: list[ScoreItem]) -> ChatRequest:
        return ChatRequest(prompts.detection_messages(explanation, [i.text for i in batch]), _answer_tokens(len(batch)),
                           top_logprobs=self.config.top_logprobs)

    def map(self, fn, items: list, what: str) -> list:
        workers = max(1, min(self.client.max_concurrency, self.scorer.max_concurrency, len(items) or 1))

        with ThreadPoolExecutor(workers) as pool:
            # pool.map keeps the input order; the first error propagates (the cache keeps the rest).
            return list(tqdm(pool.map(fn, items), total=len(items), desc=what, disable=not self.progress))


def _choose(latents: pd.DataFrame, store, config: ExplainConfig) -> list[LatentSamples]:
    if config.latents is not None:
        unknown = sorted(set(config.latents) - set(latents["latent"].tolist()))
        if unknown:
            raise CrossdiffError(f"no latent {unknown[0]} in the table (it has {len(latents)})")
        order = list(dict.fromkeys(config.latents))
    else:
        live = latents[~latents["dead"]]
        confirmed = live[(live["tag"] == "chat-only") & live["chat_specific"].fillna(False).astype(bool)]
        leaning = live.sort_values(["dnorm", "latent"], ascending=[False, True])
        order = list(dict.fromkeys(confirmed.sort_values(["dnorm", "latent"], ascending=[False, True])["latent"].tolist()
                                   + leaning["latent"].tolist()))
    chosen, spent = [], 0
    for latent in order:
        if len(chosen) == config.max_latents:
            break
        s = latent_samples(store, int(latent), config.samples, config.seed)
        if s is None:
            continue
        cost = _estimated_tokens(s, config)
        if spent + cost > config.max_tokens:
            if not chosen:
                raise CrossdiffError(f"a token budget of {config.max_tokens} is below the cost of one latent (about {cost})")
            break
        chosen.append(s)
        spent += cost
    return chosen


def _estimated_tokens(s: LatentSamples, config: ExplainConfig) -> int:
    """Prompt characters / 4 plus the answer limits, of the explain request and the three
    explanations' detection requests (each explanation taken at its longest)."""
    explain_prompt = sum(len(c) for _, c in prompts.explainer_messages(s.explain))
    size = config.detection_batch or len(s.score)
    batches = math.ceil(len(s.score) / size)
    header = sum(len(c) for _, c in prompts.detection_messages("x" * 4 * config.explain_max_tokens, [""] * size))
    detect = batches * header + sum(len(i.text) for i in s.score)
    return explain_prompt // 4 + config.explain_max_tokens + 3 * (detect // 4 + batches * _answer_tokens(size))


def _answer_tokens(n: int) -> int:
    """Room for the answer: "Yes"/"No" for one excerpt, a list of n 0/1 for a batch."""
    return 3 if n == 1 else 4 * n + 8


def _parse_explanation(completion, s: LatentSamples) -> tuple[str | None, bool, bool]:
    text, abstained = prompts.parse_explanation(completion.text, s.explain)
    return text, abstained, text is None and not abstained


def _answer(completion, batch: list[ScoreItem]) -> tuple[list[int], list[int] | None, list[float] | None]:
    """(labels, 0/1 answers or None if unparseable, P(1) per excerpt or None)."""
    labels = [item.label for item in batch]
    answer = prompts.parse_detection(completion.text, len(labels))
    return labels, answer, prompts.detection_probabilities(completion.logprobs, len(labels))


def _scores(parts: list) -> dict[str, Any]:
    """Scores of one explanation over its batches. Accuracy, balanced accuracy and F1 count
    the parsed answers (unparseable batches are counted and left out); the AUC needs
    log-probabilities for every excerpt."""
    parsed = [(labels, answer) for labels, answer, _ in parts if answer is not None]
    labels = [y for part in parsed for y in part[0]]
    answers = [a for part in parsed for a in part[1]]
    auc = math.nan
    if all(probs is not None for _, _, probs in parts):
        auc = roc_auc([y for part in parts for y in part[0]], [p for part in parts for p in part[2]])
    return {**detection_scores(labels, answers), "auc": auc, "parse_failures": len(parts) - len(parsed)}


def _derangement(latents: list[int], seed: int) -> dict[int, int]:
    """latent -> another latent, each used once (a seeded shuffle shifted by one)."""
    if len(latents) < 2:
        return {}
    order = list(latents)
    random.Random(seed).shuffle(order)
    return {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}


def _num(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.2f}"


def _nanmean(values: pd.Series) -> float:
    values = values.astype(float).to_numpy()
    return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
