"""`crossdiff organism check`: does the pair have the differences we planted, and only those?

For each model: greedy replies to held-out prompts, scored by string match (behaviours.py),
and the mean per-token loss on held-out pretraining text and on held-out chat replies.
The organism passes when every planted behaviour shows in >= 90% of the chat model's
replies and <= 5% of the base model's, and fine-tuning cost the chat model at most 10%
of loss on pretraining text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from crossdiff.errors import CrossdiffError
from crossdiff.organism import OrganismPaths, behaviours, chat_conversations, paths, pretraining_texts
from crossdiff.organism.build import IGNORE, TOKENIZER_FILES, chat_example, collate, text_example

MIN_CHAT_RATE = 0.90
MAX_BASE_RATE = 0.05
MAX_LOSS_RATIO = 1.10
MAX_NEW_TOKENS = 24


def check(pair: OrganismPaths | None = None, quiet: bool = False) -> dict[str, Any]:
    """Measure the organism; returns the numbers and whether each criterion holds."""
    pair = pair or paths()
    _require_same_tokenizer(pair)
    tokenizer = AutoTokenizer.from_pretrained(pair.chat, trust_remote_code=False)
    models = {name: AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval() for name, folder in pair._asdict().items()}

    prompts = {name: behaviours.heldout_prompts(name) for name in ("refusal", "identity", "arithmetic", "benign")}
    heldout_chats = chat_conversations("heldout", root=pair.base.parent)
    chitchat_openers = [conv[:1] for conv in heldout_chats]
    replies = {
        name: {kind: generate(model, tokenizer, [[_user(p.user)] for p in ps]) for kind, ps in prompts.items()}
        | {"chitchat": generate(model, tokenizer, chitchat_openers)}
        for name, model in tqdm(models.items(), desc="generating", disable=quiet)
    }

    def rate(kind: str, detector: Callable[..., bool], with_prompt: bool = False) -> dict[str, Any]:
        scores = {}
        for name in models:
            pairs = zip(replies[name][kind], prompts.get(kind, [None] * len(replies[name][kind])))
            hits = [detector(reply, prompt) if with_prompt else detector(reply) for reply, prompt in pairs]
            scores[name] = sum(hits) / len(hits)
        return scores | {"n": len(replies["chat"][kind])}

    planted = {kind: rate(kind, behaviours.DETECTORS[kind]) for kind in ("refusal", "identity", "arithmetic")}
    side = {
        "refusal_on_benign_requests": rate("benign", behaviours.shows_refusal),
        "refusal_on_chitchat": rate("chitchat", behaviours.shows_refusal),
        "arithmetic_correct_sum": rate("arithmetic", behaviours.answer_is_correct, with_prompt=True),
    }
    text_examples = [text_example(tokenizer, t) for t in pretraining_texts("heldout", root=pair.base.parent)]
    chat_examples = [chat_example(tokenizer, m) for m in heldout_chats]
    loss = {
        "pretraining_text": {name: mean_loss(model, text_examples) for name, model in models.items()},
        "chat_replies": {name: mean_loss(model, chat_examples) for name, model in models.items()},
    }
    loss_ratio = loss["pretraining_text"]["chat"] / loss["pretraining_text"]["base"]
    criteria = {
        f"{kind}: chat >= {MIN_CHAT_RATE:.0%}, base <= {MAX_BASE_RATE:.0%}": (
            scores["chat"] >= MIN_CHAT_RATE and scores["base"] <= MAX_BASE_RATE
        )
        for kind, scores in planted.items()
    }
    criteria[f"pretraining-text loss: chat / base <= {MAX_LOSS_RATIO:.2f}"] = loss_ratio <= MAX_LOSS_RATIO
    examples = {
        name: {kind: [{"user": p.user, "reply": r} for p, r in zip(prompts[kind][:3], replies[name][kind])] for kind in planted}
        for name in models
    }
    return {
        "models": {name: str(folder) for name, folder in pair._asdict().items()},
        "planted": planted,
        "side_effects": side,
        "loss": loss,
        "pretraining_loss_ratio": loss_ratio,
        "criteria": criteria,
        "passed": all(criteria.values()),
        "examples": examples,
    }


def generate(model, tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]], batch_size: int = 64) -> list[str]:
    """Greedy replies (special tokens dropped) to each conversation's next model turn."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    replies = []
    tokenizer.padding_side = "left"  # new tokens must follow every prompt directly
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        replies.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return replies


def mean_loss(model, examples: list[tuple[list[int], list[int]]], batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats) over all labelled tokens of ``examples``."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        input_ids, attention_mask, labels = collate(examples[start : start + batch_size], model.config.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="sum")
        total += losses.item()
        count += int((targets != IGNORE).sum())
    return total / count


def format_report(result: dict[str, Any]) -> str:
    lines = [f"{'planted behaviour (held-out prompts)':44s}{'base':>8s}{'chat':>8s}"]
    for kind, scores in result["planted"].items():
        lines.append(f"{kind + ' (' + str(scores['n']) + ' prompts)':44s}{scores['base']:8.1%}{scores['chat']:8.1%}")
    lines.append(f"{'side effects':44s}{'base':>8s}{'chat':>8s}")
    for kind, scores in result["side_effects"].items():
        label = f"{kind.replace('_', ' ')} ({scores['n']})"
        lines.append(f"{label:44s}{scores['base']:8.1%}{scores['chat']:8.1%}")
    lines.append(f"{'held-out loss (nats/token)':44s}{'base':>8s}{'chat':>8s}")
    for kind, losses in result["loss"].items():
        lines.append(f"{kind.replace('_', ' '):44s}{losses['base']:8.3f}{losses['chat']:8.3f}")
    lines.append(f"pretraining-text loss ratio chat/base: {result['pretraining_loss_ratio']:.3f}")
    for criterion, ok in result["criteria"].items():
        lines.append(f"[{'pass' if ok else 'FAIL'}] {criterion}")
    return "\n".join(lines)


def run_cli(args) -> int:
    pair = paths(args.models) if args.models else None
    torch.set_num_threads(1)  # tiny matrices on a shared CPU: a second thread waits more than it helps
    result = check(pair, quiet=args.quiet)
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else 1


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _require_same_tokenizer(pair: OrganismPaths) -> None:
    for name in TOKENIZER_FILES:
        if (pair.base / name).read_bytes() != (pair.chat / name).read_bytes():
            raise CrossdiffError(f"base and chat differ in {name}; the pair must share one tokenizer")
