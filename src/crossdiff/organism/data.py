"""The demo's data from the organism: its held-out text, chitchat, and conversations that
exercise each planted behaviour (the organism's counterpart of ``smollm2/data.py``)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from crossdiff.files import write_text_atomic
from crossdiff.organism import chat_conversations, heldout_prompts, pretraining_texts
from crossdiff.organism.behaviours import sample_prompt

BEHAVIOURS = ("refusal", "benign", "identity", "arithmetic")


def write_demo_data(folder: Path, config: Any) -> tuple[Path, Path]:
    """The demo's two text sources as jsonl files: pretraining text and chat conversations;
    beside them, causal_prompts.jsonl: the held-out prompts of the KL experiment.

    ``config`` is a DemoConfig or a recipe's [data] table (behaviour_conversations, seed,
    causal_per_behaviour, causal_chitchat)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    conversations = [{"messages": messages} for messages in chat_conversations("heldout")]
    for behaviour in BEHAVIOURS:
        for _ in range(config.behaviour_conversations):
            prompt = sample_prompt(behaviour, rng)
            conversations.append({"messages": [{"role": "user", "content": prompt.user},
                                               {"role": "assistant", "content": prompt.reply}]})
    rng.shuffle(conversations)  # interleave behaviours with chitchat under any token budget
    pretraining = folder / "pretraining.jsonl"
    chat = folder / "chat.jsonl"
    _write_jsonl(pretraining, [{"text": text} for text in pretraining_texts("heldout")])
    _write_jsonl(chat, conversations)
    _write_jsonl(folder / "causal_prompts.jsonl", causal_prompt_rows(config.causal_per_behaviour, config.causal_chitchat, config.seed))
    return pretraining, chat


def causal_prompts(per_behaviour: int = 10, chitchat: int = 30, seed: int = 0) -> list[str]:
    """Held-out prompts for the KL experiment: every planted behaviour, plus ordinary chitchat openers."""
    return [row["prompt"] for row in causal_prompt_rows(per_behaviour, chitchat, seed)]


def causal_prompt_rows(per_behaviour: int = 10, chitchat: int = 30, seed: int = 0) -> list[dict[str, str]]:
    """:func:`causal_prompts` as rows ``{"prompt", "group"}``, the group a planted behaviour or ``chitchat``."""
    rng = random.Random(seed)
    rows = []
    for behaviour in BEHAVIOURS:
        held_out = heldout_prompts(behaviour)
        rows += [{"prompt": p.user, "group": behaviour} for p in rng.sample(held_out, min(per_behaviour, len(held_out)))]
    rows += [{"prompt": " ".join(c[0]["content"].split()), "group": "chitchat"}
             for c in chat_conversations("heldout")[:chitchat]]
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if not path.exists() or path.read_text(encoding="utf-8") != text:  # unchanged input keeps the cache valid
        write_text_atomic(path, text)
