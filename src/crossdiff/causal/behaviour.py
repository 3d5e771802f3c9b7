"""The behavioural diff: what the chat model does differently, prompt by prompt, before any latent.

For a prompt set, both models answer every prompt greedily through the chat template
(prompt plus answer within the models' context, crossdiff.causal.conversations), and the
base-to-chat KL, KL(p_chat || p_base), is taken on the chat model's answer tokens: the
positions that predict them, as the KL experiment scores them (docs/method.md 6; the end of
turn counts). It says how much the base model would have to change to say what the chat
model says. Prompts are ranked by their mean KL per answer token; when prompts carry a
``group`` (a column of the prompt file), each group gets the token-weighted mean KL with a
95% interval over its prompts (crossdiff.causal.kl). The default prompts are the first user
turns of the recipe's first chat (or answers) source.

Outputs, in the run folder (``crossdiff run``'s ``behaviour`` stage, or ``crossdiff behaviour``)::

    behaviour_diff.jsonl   one row per prompt, ranked by KL: rank, prompt, group, both answers, KL
    behaviour_diff.json    settings, headline numbers, histogram, groups and the top prompts; written last
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from crossdiff.analysis.read import BEHAVIOUR_ROWS as ROWS, BEHAVIOUR_SUMMARY as SUMMARY
from crossdiff.analysis.read import read_behaviour  # noqa: F401 (re-exported: the report and the CLI read it from here)
from crossdiff.causal.config import BehaviourConfig
from crossdiff.causal.conversations import answer_prompts, load_prompts, prediction_masks, source_prompts, tokenize_conversation
from crossdiff.causal.kl import kl_per_token, weighted_mean_ci
from crossdiff.config import to_dict
from crossdiff.errors import CrossdiffError
from crossdiff.files import write_json_atomic, write_text_atomic
from crossdiff.locks import output_lock
from crossdiff.models import context_length, load_model_pair, pad_batch
from crossdiff.terminal import printable
from crossdiff.texts import TextSourceConfig, iter_column

HISTOGRAM_BINS = 20


def load_prompt_set(config: BehaviourConfig, sources: Sequence[Any] = ()) -> tuple[list[str], list[str | None], str]:
    """``(prompts, groups, where)``: the configured prompts, or the first user turns of the first
    chat/answers source among ``sources``; blank prompts dropped; one line when none is left."""
    if config.prompts is not None:
        prompts, where = load_prompts(config.prompts, column=config.column, limit=config.limit), config.prompts
        groups: list[Any] = [None] * len(prompts)
        if not config.prompts.endswith(".txt"):
            try:
                source = TextSourceConfig(name="groups", kind="text", path=config.prompts, column=config.group_column, max_docs=config.limit)
                groups = [None if g is None else str(g) for _, g in iter_column(source)]
            except CrossdiffError as err:
                if "no column" not in str(err):
                    raise
    else:
        chat = next((s for s in sources if s.kind in ("chat", "answers")), None)
        if chat is None:
            raise CrossdiffError("behaviour: no prompts given and the recipe has no chat source to take first user turns from")
        limits = [n for n in (config.limit, chat.max_docs) if n is not None]
        prompts = source_prompts(replace(chat, max_docs=min(limits) if limits else None))
        where = f"first user turns of source '{chat.name}'"
        groups = [None] * len(prompts)
    kept = [(p, g) for p, g in zip(prompts, groups) if p.strip()]
    if not kept:
        raise CrossdiffError(f"behaviour: no usable prompt in {where} ({len(prompts)} rows, all blank)")
    return [p for p, _ in kept], [g for _, g in kept], where


@torch.inference_mode()
def behaviour_diff(pair: Any, prompts: Sequence[str], groups: Sequence[str | None] | None = None, *,
                   max_new_tokens: int = 64, batch_size: int = 8) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Both models' greedy answers and the KL per prompt: ``(rows ranked by KL, summary)``."""
    groups = list(groups) if groups is not None else [None] * len(prompts)
    context = context_length(pair.base, pair.chat)
    answers = {}
    for role in ("chat", "base"):
        conversations = answer_prompts(getattr(pair, role), pair.tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, max_len=context)
        answers[role] = [c[-1]["content"] for c in conversations]
    kls = answer_kl(pair, [[{"role": "user", "content": p}, {"role": "assistant", "content": a}]
                           for p, a in zip(prompts, answers["chat"])], batch_size=batch_size, max_len=context)
    rows = [{"prompt": p, "group": g, "chat_answer": c, "base_answer": b, **kl}
            for p, g, c, b, kl in zip(prompts, groups, answers["chat"], answers["base"], kls)]
    rows.sort(key=lambda row: -row["kl_mean"])
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows, summarise(rows)


def answer_kl(pair: Any, conversations: Sequence[list[dict[str, str]]], *, batch_size: int, max_len: int | None) -> list[dict[str, Any]]:
    """Per conversation: KL(p_chat || p_base) summed and averaged over the positions that predict
    assistant tokens, their number, and the KL at the first of them."""
    tokenized = [tokenize_conversation(pair.tokenizer, c, i, max_len or 10**9) for i, c in enumerate(conversations)]
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    results = []
    for start in range(0, len(tokenized), batch_size):
        batch = tokenized[start:start + batch_size]
        input_ids, attention_mask = pad_batch([c.input_ids for c in batch], pad)
        width = input_ids.shape[1]
        assistant = np.array([c.assistant + [False] * (width - len(c.assistant)) for c in batch])
        template = np.array([c.template + [False] * (width - len(c.template)) for c in batch])
        scored = torch.from_numpy(prediction_masks(assistant, template, k=1)["all"])
        logits = {}
        for role in ("chat", "base"):
            model = getattr(pair, role)
            device = next(model.parameters()).device
            logits[role] = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 use_cache=False).logits.float().cpu()
        vocab = min(logits["chat"].shape[-1], logits["base"].shape[-1])  # padded vocabularies differ only in unused rows
        kl = torch.zeros(scored.shape)
        kl[scored] = kl_per_token(torch.log_softmax(logits["chat"][..., :vocab][scored], dim=-1), logits["base"][..., :vocab][scored])
        for row in range(len(batch)):
            values = kl[row][scored[row]]
            n = int(values.numel())
            results.append({"kl_mean": float(values.mean()) if n else 0.0, "kl_sum": float(values.sum()), "n_tokens": n,
                            "kl_first": float(values[0]) if n else 0.0})
    return results


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline numbers, the histogram of per-prompt KL and the per-group means (with 95% intervals)."""
    means = np.array([r["kl_mean"] for r in rows])
    mean, low, high = weighted_mean_ci(np.array([r["kl_sum"] for r in rows]), np.array([r["n_tokens"] for r in rows]))
    counts, edges = np.histogram(means, bins=HISTOGRAM_BINS, range=(0.0, float(means.max()) or 1.0))
    groups = {}
    for name in sorted({r["group"] for r in rows if r["group"] is not None}):
        members = [r for r in rows if r["group"] == name]
        g_mean, g_low, g_high = weighted_mean_ci(np.array([r["kl_sum"] for r in members]), np.array([r["n_tokens"] for r in members]))
        groups[name] = {"prompts": len(members), "kl_mean": g_mean, "ci_low": g_low, "ci_high": g_high,
                        "median_prompt": float(np.median([r["kl_mean"] for r in members])),
                        "best_rank": min(r["rank"] for r in members)}
    groups = dict(sorted(groups.items(), key=lambda item: -item[1]["kl_mean"]))
    return {"prompts": len(rows), "tokens": int(sum(r["n_tokens"] for r in rows)), "kl_mean": mean, "ci_low": low, "ci_high": high,
            "median_prompt": float(np.median(means)), "histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
            "groups": groups, "top": [{k: r[k] for k in ("rank", "prompt", "group", "kl_mean")} for r in rows[:10]]}


def format_behaviour(rows: list[dict[str, Any]], summary: dict[str, Any], where: str = "", *, top: int = 8) -> str:
    """The behavioural diff on one screen (at most 40 lines)."""
    lines = [f"behavioural diff: KL(chat || base) on the chat model's answer tokens, {summary['prompts']} prompts"
             f"{f' ({where})' if where else ''}",
             f"  mean {summary['kl_mean']:.3f} nats/token (95% CI {_num(summary['ci_low'])}..{_num(summary['ci_high'])}), "
             f"median prompt {summary['median_prompt']:.3f}"]
    groups = list(summary["groups"].items())
    if groups:
        lines.append(f"  by group (token-weighted mean, 95% CI, prompts; highest first):")
        for name, g in groups[:8]:
            lines.append(f"    {printable(name)[:20]:20s} {g['kl_mean']:7.3f}  [{_num(g['ci_low'])}, {_num(g['ci_high'])}]  {g['prompts']:4d}")
        if len(groups) > 8:
            lines.append(f"    ... and {len(groups) - 8} more groups")
    lines.append("  prompts per KL bin (nats/token):")
    counts, edges = summary["histogram"]["counts"], summary["histogram"]["edges"]
    merged = [(edges[i], edges[i + 2], counts[i] + counts[i + 1]) for i in range(0, len(counts), 2)]  # 10 lines
    widest = max(c for _, _, c in merged) or 1
    for low, high, count in merged:
        lines.append(f"    {low:6.2f}-{high:<6.2f} {'#' * math.ceil(30 * count / widest) if count else '':30s} {count}")
    lines.append(f"  top {min(top, len(rows))} prompts: KL  prompt  -> chat answer | base answer")
    for row in rows[:top]:
        group = f"[{printable(row['group'])}] " if row["group"] is not None else ""
        lines.append(f"  {row['rank']:3d} {row['kl_mean']:6.2f}  {group}{_cut(row['prompt'], 40)}  -> "
                     f"{_cut(row['chat_answer'], 36)} | {_cut(row['base_answer'], 24)}")
    return "\n".join(lines)


def run_behaviour(config: BehaviourConfig, out: Path, *, base: str, chat: str, sources: Sequence[Any] = (), pair: Any = None,
                  quiet: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Load the prompts (and the models, unless given), compute the diff and write both files."""
    prompts, groups, where = load_prompt_set(config, sources)
    if pair is None:
        pair = load_model_pair(base, chat, dtype=config.model_dtype, device=config.device)
    rows, summary = behaviour_diff(pair, prompts, groups, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size)
    summary = {**summary, "settings": {**to_dict(config), "base": str(base), "chat": str(chat), "prompt_set": where}}
    with output_lock(out, "behaviour") as out:
        write_text_atomic(out / ROWS, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        write_json_atomic(out / SUMMARY, summary)  # last: the stage is done
    if not quiet:
        print(format_behaviour(rows, summary, where))
    return rows, summary


def _num(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _cut(text: str, width: int) -> str:
    text = printable(" ".join(str(text).split()))
    return text if len(text) <= width else text[:width - 1] + "…"


# ----------------------------------------------------------------------------- CLI
