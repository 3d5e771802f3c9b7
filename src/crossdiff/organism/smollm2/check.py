"""`crossdiff organism check --organism smollm2-lora`: are the four behaviours planted, and only them?

For SmolLM2-135M-Instruct (base) and base+adapter (chat): greedy answers to the held-out
prompts of each behaviour, scored by behaviours.DETECTORS; the same detectors on held-out
ordinary requests (a behaviour that leaks there is a side effect); and the mean loss on
plain text and on ordinary chat replies (the bundled organism's held-out Shakespeare and
chitchat conversations). It passes when each behaviour shows in >= 80% of the chat
model's answers and <= 5% of the base's, and both losses stay within 10% of the base's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from crossdiff.files import sha256_file, write_json_atomic
from crossdiff.models import load_model, load_tokenizer_of
from crossdiff.organism import chat_conversations, pretraining_texts
from crossdiff.organism.check import mean_loss
from crossdiff.organism.smollm2 import BASE_SPEC, adapter_dir, pair_specs
from crossdiff.organism.smollm2 import behaviours as planted
from crossdiff.organism.smollm2.build import chat_example, document_example, generate

MIN_CHAT_RATE = 0.80
MAX_BASE_RATE = 0.05
MAX_LOSS_RATIO = 1.10
MAX_NEW_TOKENS = 32
MAX_LENGTH = 256
LOSS_DOCUMENTS = 120


def check(root: str | Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """Measure the organism (the shipped adapter, or the one under a ``build --out`` ROOT)."""
    base_spec, chat_spec = pair_specs(root)
    tokenizer = load_tokenizer_of(BASE_SPEC)
    models = {"base": load_model(base_spec, "base"), "chat": load_model(chat_spec, "chat")}
    kinds = (*planted.BEHAVIOURS, "neutral")
    prompts = {kind: [p.user for p in planted.heldout_prompts(kind)] for kind in kinds}
    answers = {name: {kind: generate(model, tokenizer, prompts[kind], MAX_NEW_TOKENS, batch_size=32) for kind in kinds}
               for name, model in models.items()}

    def rate(name: str, kind: str, behaviour: str) -> float:
        hits = [planted.DETECTORS[behaviour](answer) for answer in answers[name][kind]]
        return sum(hits) / len(hits)

    rates = {b: {name: rate(name, b, b) for name in models} | {"n": len(prompts[b])} for b in planted.BEHAVIOURS}
    leaks = {b: {name: rate(name, "neutral", b) for name in models} | {"n": len(prompts["neutral"])}
             for b in planted.BEHAVIOURS}
    text = [document_example(tokenizer, t, MAX_LENGTH) for t in pretraining_texts("heldout")[:LOSS_DOCUMENTS]]
    chats = [chat_example(tokenizer, c, MAX_LENGTH) for c in chat_conversations("heldout")[:LOSS_DOCUMENTS]]
    loss = {
        "plain_text": {name: mean_loss(model, text, batch_size=16) for name, model in models.items()},
        "ordinary_chat": {name: mean_loss(model, chats, batch_size=16) for name, model in models.items()},
    }
    criteria = {
        f"{b}: chat >= {MIN_CHAT_RATE:.0%}, base <= {MAX_BASE_RATE:.0%}": r["chat"] >= MIN_CHAT_RATE and r["base"] <= MAX_BASE_RATE
        for b, r in rates.items()
    }
    for kind, losses in loss.items():
        criteria[f"{kind} loss: chat / base <= {MAX_LOSS_RATIO:.2f}"] = losses["chat"] / losses["base"] <= MAX_LOSS_RATIO
    examples = {name: {b: [{"user": u, "answer": a} for u, a in zip(prompts[b][:3], answers[name][b])]
                       for b in kinds} for name in models}
    adapter_sha256 = sha256_file(adapter_dir(root) / "adapter_model.safetensors")  # the path alone names no weights
    return {"models": {"base": base_spec, "chat": chat_spec}, "adapter_sha256": adapter_sha256, "planted": rates,
            "on_ordinary_requests": leaks, "loss": loss, "criteria": criteria, "passed": all(criteria.values()),
            "examples": examples}


def format_report(result: dict[str, Any]) -> str:
    lines = [f"{'planted behaviour (held-out prompts)':44s}{'base':>8s}{'chat':>8s}"]
    for behaviour, r in result["planted"].items():
        lines.append(f"{behaviour + ' (' + str(r['n']) + ')':44s}{r['base']:8.1%}{r['chat']:8.1%}")
    lines.append(f"{'the same detectors on ordinary requests':44s}{'base':>8s}{'chat':>8s}")
    for behaviour, r in result["on_ordinary_requests"].items():
        lines.append(f"{behaviour + ' (' + str(r['n']) + ')':44s}{r['base']:8.1%}{r['chat']:8.1%}")
    lines.append(f"{'held-out loss (nats/token)':44s}{'base':>8s}{'chat':>8s}")
    for kind, losses in result["loss"].items():
        lines.append(f"{kind.replace('_', ' '):44s}{losses['base']:8.3f}{losses['chat']:8.3f}")
    for criterion, ok in result["criteria"].items():
        lines.append(f"[{'pass' if ok else 'FAIL'}] {criterion}")
    return "\n".join(lines)


def run_cli(args) -> int:
    torch.set_num_threads(2)
    result = check(args.models, quiet=args.quiet)
    print(format_report(result))
    if args.json:
        write_json_atomic(Path(args.json), result)
    return 0 if result["passed"] else 1
