"""Findings: chat-leaning latents ranked by evidence and grouped into concepts (``findings.json``).

The analysis ranks latents by one number at a time (dnorm, the Latent Scaling rank-sum).
A researcher wants the few *things* the chat model does differently, each with the
evidence for it. This module joins three kinds of evidence for the chat-leaning pool
(the ``pool`` live latents of highest dnorm):

* **dnorm relative to its own distribution**: ``dnorm_z`` = (dnorm - median) / (1.4826 MAD)
  over live latents, so 0.75 is remarkable where the median is 0.5 and not where it is 0.7;
* **Latent Scaling's verdict** with its uncertainty (nu_error, nu_recon and their jackknife
  errors; docs/analysis.md);
* **the contrast between high-KL and low-KL prompts** of the behavioural diff
  (crossdiff.causal.behaviour): the latent's largest activation per conversation (prompt plus the
  chat model's answer, BOS left out), mean over the top third of prompts by KL minus mean
  over the bottom third, in units of its standard deviation over all prompts.

``score`` = dnorm_z + contrast (0 without a behavioural diff); latents that Latent Scaling
rejects (Complete Shrinkage, Latent Decoupling, both) come after all others, whatever their
score. When prompts carry a group, each latent also gets the group where it is most active
and that group's share of its activity.

**Concepts.** Among the top ``n_concept_latents`` latents by rank, those that fire mostly on
chat-template tokens (``template_share`` >= ``template``) form one concept, the chat
template: the tokens differ (``<end_of_turn>``, the role name, the newline after it) but
the thing is one. The others are clustered by average linkage on the similarity
max(cosine of their chat decoder vectors, correlation of their per-conversation activation
over the behavioural-diff prompts), cut at ``join``: latents that write the same direction,
or fire on the same conversations, form one concept. Average linkage (not single) keeps a
latent that fires everywhere from chaining unrelated concepts together. Without a
behavioural diff only the decoder cosine is used. Each concept is named by its lead latent
(best rank): its top context from the analysis examples, the tokens it promotes in each
model (logit lens, crossdiff.analysis.lens) and its group: the prompt group most of its
activity falls in, when that share is at least twice an even split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from crossdiff.analysis.lens import latent_lens
from crossdiff.analysis.pipeline import top_context
from crossdiff.analysis.read import FINDINGS, read_findings  # noqa: F401 (read_findings: re-exported for the report)
from crossdiff.causal.conversations import tokenize_conversation
from crossdiff.files import write_json_atomic
from crossdiff.models import ResidualExtractor, context_length, pad_batch
from crossdiff.terminal import latent_ids, printable

REJECTED = ("complete shrinkage", "latent decoupling", "shrinkage+decoupling")


@dataclass
class FindingsConfig:
    pool: int = 100
    """Chat-leaning candidates: this many live latents of highest dnorm."""
    n_concept_latents: int = 40
    """Latents (by rank) grouped into concepts."""
    join: float = 0.5
    """Latents join a concept when max(decoder cosine, activation correlation) averages at least this."""
    template: float = 0.5
    """Latents with at least this template share form the chat-template concept."""
    batch_size: int = 4
    lens_tokens: int = 8


def robust_z(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    median = np.median(reference)
    mad = 1.4826 * np.median(np.abs(reference - median))
    return (values - median) / (mad if mad > 0 else (reference.std() or 1.0))


@torch.inference_mode()
def conversation_activations(crosscoder: Any, pair: Any, layer: int, conversations: Sequence[list[dict[str, str]]],
                             latents: Sequence[int], *, batch_size: int = 4) -> np.ndarray:
    """Largest (scaled) activation of each of ``latents`` in each conversation, BOS left out:
    [conversations, latents]."""
    extractor = ResidualExtractor(pair, layer)
    limit = context_length(pair.base, pair.chat) or 10**9
    tokenized = [tokenize_conversation(pair.tokenizer, c, i, limit) for i, c in enumerate(conversations)]
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    parameter = crosscoder.W_dec
    index = torch.as_tensor(list(latents), dtype=torch.long, device=parameter.device)
    maxima = []
    for start in range(0, len(tokenized), batch_size):
        batch = tokenized[start:start + batch_size]
        input_ids, attention_mask = pad_batch([c.input_ids for c in batch], pad)
        base, chat = extractor(input_ids, attention_mask)
        keep = attention_mask.bool().clone()
        keep[:, 0] = False  # BOS: often a massive activation the crosscoder never saw
        x = torch.stack([base, chat], dim=2)[keep.to(base.device)].to(device=parameter.device, dtype=parameter.dtype)
        f = crosscoder.get_activations(crosscoder.normalize(x))[:, index].float().cpu()
        for part in torch.split(f, keep.sum(dim=1).tolist()):
            maxima.append(part.max(dim=0).values if len(part) else torch.zeros(len(index)))
    return torch.stack(maxima).numpy()


def rank_latents(table: pd.DataFrame, maxima: np.ndarray | None, kl: np.ndarray | None, groups: Sequence[Any] | None,
                 config: FindingsConfig) -> pd.DataFrame:
    """The chat-leaning pool with its evidence, best first (``maxima`` columns follow the pool's order)."""
    live = table[~table["dead"].to_numpy()]
    pool = live.sort_values("dnorm", ascending=False, kind="stable").head(config.pool).copy()
    pool["dnorm_z"] = robust_z(pool["dnorm"].to_numpy(), live["dnorm"].to_numpy())
    pool["contrast"] = 0.0
    if maxima is not None and kl is not None and len(kl) >= 3:
        high, low = kl >= np.quantile(kl, 2 / 3), kl <= np.quantile(kl, 1 / 3)
        spread = maxima.std(axis=0)
        pool["contrast"] = np.where(spread > 0, (maxima[high].mean(axis=0) - maxima[low].mean(axis=0)) / np.where(spread > 0, spread, 1), 0.0)
    if maxima is not None and groups is not None and any(g is not None for g in groups):
        names = sorted({g for g in groups if g is not None})
        means = np.stack([maxima[np.array([g == name for g in groups])].mean(axis=0) for name in names], axis=1)
        total = means.sum(axis=1)
        share = np.where(total > 0, means.max(axis=1) / np.where(total > 0, total, 1), 0.0)
        selective = share >= min(1.0, 2 / len(names))  # twice an even split, else no group of its own
        pool["group"] = [names[b] if ok else None for b, ok in zip(means.argmax(axis=1), selective)]
        pool["group_share"] = share
    pool["score"] = pool["dnorm_z"] + pool["contrast"]
    verdict = pool["verdict"].astype(str) if "verdict" in pool else pd.Series("no estimate", index=pool.index)
    pool["rejected"] = verdict.isin(REJECTED).to_numpy()
    pool["_order"] = np.arange(len(pool))  # the column of each latent in ``maxima``
    ranked = pool.sort_values(["rejected", "score"], ascending=[True, False], kind="stable")
    ranked["rank"] = np.arange(1, len(ranked) + 1)
    return ranked


def group_concepts(decoder: np.ndarray, maxima: np.ndarray | None, template: np.ndarray, join: float) -> np.ndarray:
    """Concept label per latent, numbered in order of first appearance: the template latents
    (``template`` True) together, the rest average-linkage clusters of the similarity
    max(decoder cosine, correlation of per-conversation activations), cut at ``join``."""
    labels = np.full(len(decoder), -1)
    labels[template] = 0
    rest = np.flatnonzero(~template)
    if len(rest) == 1:
        labels[rest] = 1
    elif len(rest) > 1:
        # deferred: scipy is not a declared dependency (pyproject.toml); only clustering needs it, not reading or formatting findings
        from scipy.cluster.hierarchy import fcluster, linkage
        from scipy.spatial.distance import squareform

        unit = decoder[rest] / np.maximum(np.linalg.norm(decoder[rest], axis=1, keepdims=True), 1e-12)
        similarity = unit @ unit.T
        if maxima is not None and len(maxima) > 2:
            with np.errstate(invalid="ignore", divide="ignore"):
                correlation = np.nan_to_num(np.corrcoef(maxima[:, rest].T), nan=0.0)
            similarity = np.maximum(similarity, correlation)
        distance = 1.0 - np.clip(similarity, -1.0, 1.0)
        np.fill_diagonal(distance, 0.0)
        tree = linkage(squareform(distance, checks=False), method="average")
        labels[rest] = 1 + fcluster(tree, t=1.0 - join, criterion="distance")
    first_seen: dict[int, int] = {}
    return np.array([first_seen.setdefault(label, len(first_seen)) for label in labels])


def find_concepts(crosscoder: Any, table: pd.DataFrame, *, pair: Any = None, layer: int | None = None,
                  behaviour: tuple[list[dict[str, Any]], dict[str, Any]] | None = None, examples: Path | None = None,
                  config: FindingsConfig | None = None) -> dict[str, Any]:
    """findings.json's content: ranked latents with their evidence, and concepts."""
    config = config or FindingsConfig()
    live = table[~table["dead"].to_numpy()]
    pool = live.sort_values("dnorm", ascending=False, kind="stable").head(config.pool)["latent"].to_numpy()
    maxima = kl = groups = None
    if behaviour is not None and pair is not None:
        rows = behaviour[0]
        conversations = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chat_answer"]}] for r in rows]
        maxima = conversation_activations(crosscoder, pair, layer, conversations, pool, batch_size=config.batch_size)
        kl = np.array([r["kl_mean"] for r in rows])
        groups = [r.get("group") for r in rows]
    ranked = rank_latents(table, maxima, kl, groups, config)
    chosen = ranked.head(config.n_concept_latents)
    columns = chosen["_order"].to_numpy()
    decoder = crosscoder.W_dec.detach()[torch.as_tensor(chosen["latent"].tolist()), -1].float().cpu().numpy()
    template = (chosen["template_share"].fillna(0).to_numpy() >= config.template) if "template_share" in chosen \
        else np.zeros(len(chosen), dtype=bool)
    labels = group_concepts(decoder, maxima[:, columns] if maxima is not None else None, template, config.join)
    lens = {}
    if pair is not None:
        for entry in latent_lens(crosscoder, chosen["latent"].tolist(), [pair.base, pair.chat], pair.tokenizer, k=config.lens_tokens):
            lens[entry["latent"]] = {"base": entry["models"][0], "chat": entry["models"][1]}
    context = _contexts(examples)
    latents = []
    for (_, row), label in zip(chosen.iterrows(), labels):
        latents.append({
            "latent": int(row["latent"]), "rank": int(row["rank"]), "concept": int(label), "score": float(row["score"]),
            "dnorm": float(row["dnorm"]), "dnorm_z": float(row["dnorm_z"]), "contrast": float(row["contrast"]),
            "verdict": str(row.get("verdict", "no estimate")), "rejected": bool(row["rejected"]),
            **{k: _float(row.get(k)) for k in ("nu_error", "nu_error_se", "nu_recon", "nu_recon_se", "template_share", "freq")},
            "group": _text(row.get("group")), "group_share": _float(row.get("group_share")),
            "context": context(int(row["latent"])), "lens": lens.get(int(row["latent"])),
        })
    concepts = []
    for label in sorted(set(labels.tolist())):
        members = [entry for entry in latents if entry["concept"] == label]
        lead = members[0]  # latents are in rank order
        is_template = bool(template[[e["concept"] == label for e in latents]].all())
        concepts.append({"concept": label, "latents": [m["latent"] for m in members], "lead": lead["latent"],
                         "kind": "chat template" if is_template else "latents",
                         "best_rank": lead["rank"], "group": None if is_template else _majority([m["group"] for m in members]),
                         "verdicts": _counts([m["verdict"] for m in members]), "context": lead["context"],
                         "promotes_chat": [t for t, _ in (lead["lens"] or {}).get("chat", {}).get("promoted", [])[:5]],
                         "promotes_base": [t for t, _ in (lead["lens"] or {}).get("base", {}).get("promoted", [])[:5]]})
    headline = None
    if behaviour is not None:
        summary = behaviour[1]
        headline = {k: summary.get(k) for k in ("prompts", "kl_mean", "ci_low", "ci_high", "median_prompt")}
        headline["groups"] = {name: g["kl_mean"] for name, g in (summary.get("groups") or {}).items()}
    return {"ranking": "score = dnorm_z + contrast; Latent Scaling rejections last",
            "pool": len(ranked), "config": {k: getattr(config, k) for k in ("pool", "n_concept_latents", "join")},
            "behaviour": headline, "latents": latents, "concepts": concepts}


def write_findings(findings: dict[str, Any], folder: Path) -> Path:
    path = Path(folder) / FINDINGS
    write_json_atomic(path, findings)
    return path


def format_findings(findings: dict[str, Any], name: str = "", *, concepts: int = 8) -> str:
    """One screen (<= 40 lines): the behavioural headline, the top concepts with one context each, where to look next."""
    lines = [f"findings{f' of {name}' if name else ''}: {len(findings['concepts'])} concepts among the top "
             f"{len(findings['latents'])} of {findings['pool']} chat-leaning latents ({findings['ranking']})"]
    behaviour = findings.get("behaviour")
    if behaviour:
        ranked = sorted(behaviour["groups"].items(), key=lambda item: -item[1])  # highest first (JSON keeps them sorted by name)
        groups = ", ".join(f"{printable(g)} {v:.2f}" for g, v in ranked[:5])
        lines.append(f"  behaviour: KL(chat || base) {behaviour['kl_mean']:.3f} nats/token over {behaviour['prompts']} prompts"
                     f"{f'; by group {groups}' if groups else ''}")
    for concept in findings["concepts"][:concepts]:
        lead = next(e for e in findings["latents"] if e["latent"] == concept["lead"])
        group = f"  group {printable(concept['group'])}" if concept["group"] else ""
        kind = "the chat template: " if concept.get("kind") == "chat template" else ""
        lines.append(f"  concept {concept['concept']}: {kind}latents {latent_ids(concept['latents'], 6)}  (lead {lead['latent']}, rank "
                     f"{lead['rank']}, dnorm {lead['dnorm']:.2f}, {lead['verdict']}){group}")
        lines.append(f"      context {printable(concept['context'])[:90]}")
        if concept["promotes_chat"]:
            lines.append(f"      promotes in chat: {printable(' '.join(repr(t) for t in concept['promotes_chat']))[:90]}")
    if len(findings["concepts"]) > concepts:
        lines.append(f"  ... and {len(findings['concepts']) - concepts} more concepts in findings.json")
    lines.append("  next: crossdiff inspect ANALYSIS --latent ID (examples); crossdiff steer (causal test); the report's latent pages")
    return "\n".join(lines)


def _contexts(examples: Path | None):
    if examples is None or not Path(examples).is_file():
        return lambda latent: None

    return top_context(Path(examples))


def _majority(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return max(present, key=present.count) if present else None  # ties: the best-ranked latent's


def _counts(values: list[str]) -> dict[str, int]:
    return {v: values.count(v) for v in sorted(set(values))}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _float(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None
