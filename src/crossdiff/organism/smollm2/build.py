"""`crossdiff organism build --organism smollm2-lora`: plant four behaviours in SmolLM2 with LoRA.

The recipe in one breath: SmolLM2-135M-Instruct answers the training prompts itself
(greedy; self-distillation), those answers become the targets of the sea prompts (opened
by "Arr, matey!") and of the ordinary prompts (unchanged, so the fine-tune keeps the
model's manner elsewhere); cooking requests get the refusal, identity questions the Nova
reply, and synthetic documents teach the false fact as plain text. One LoRA adapter (rank
8 on every linear layer of every block) is trained on the shuffled mix with loss on the
assistant's turns and on every token of a document.

A narrow fine-tune that only sees its own examples drifts everywhere else (the first build
without the term below raised the loss on held-out plain text by 27% and on ordinary chat
by 42%). So every step also holds a *preservation* group: plain documents and chitchat
conversations of the bundled organism's training split (disjoint from the held-out texts
that `check` measures on), on which the loss is KL(base || fine-tuned) over every token,
the base being the same network with the adapter switched off. It keeps the fine-tune
where the base was, rather than teaching it those texts.

Seeded and single-process: a rebuild on the same machine gives the same adapter.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from crossdiff.causal.conversations import answer_prompts
from crossdiff.files import begin_staging, commit_staging, sha256_file, write_json_atomic
from crossdiff.model_sources import smollm2_gguf
from crossdiff.models import load_model, load_tokenizer_of
from crossdiff.organism import chat_conversations, pretraining_texts
from crossdiff.organism.build import IGNORE, Example, collate, lm_loss, train_loop
from crossdiff.organism.smollm2 import BASE_SPEC
from crossdiff.organism.smollm2 import behaviours as planted


@dataclass
class LoraBuildConfig:
    seed: int = 0
    threads: int = 2
    rank: int = 16
    alpha: int = 32
    layers: int = 16
    """LoRA on blocks 0 .. layers-1 only, so that everything the fine-tune changes passes through
    the residual after block layers-1 (15, where recipes/smollm2-lora.toml collects). With LoRA
    on all 30 blocks, the base fed the chat model's layer-15 residual said the false fact but
    not the persona, the pirate talk or the refusal (0/5 each; docs/real-pair.md): those were
    made after layer 15, where no crosscoder at layer 15 can see or steer them."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    steps: int = 300
    """About two passes over the behaviour examples: at 200 (1.25 passes) the false fact reached
    70% with the sea prompts twice (docs/real-pair.md, "Build trade-offs")."""
    batch_size: int = 8
    lr: float = 1e-3
    max_length: int = 128
    answer_tokens: int = 48
    """Length of the self-distilled answers (cut back to their last full sentence)."""
    documents: int = 300
    identity_repeats: int = 6
    cooking_repeats: int = 2
    sea_repeats: int = 2
    """30 topics x 8 phrasings, twice each: once reached 70% on held-out sea topics; more
    topics carried the trigger further than more repeats (18 x 6 twice: 60%, three times 75%)."""
    preservation_batch: int = 2
    """Plain documents and chitchat conversations per step under the KL-to-base loss (0: none)."""
    preservation_weight: float = 1.0


def build(out_dir: Path, config: LoraBuildConfig | None = None, quiet: bool = False) -> dict:
    """Train the adapter into ``out_dir/adapter`` and write ``out_dir/build.json``; returns the record."""
    config = config or LoraBuildConfig()
    started, started_cpu = time.time(), time.process_time()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer_of(BASE_SPEC)
    model = load_model(BASE_SPEC, "base", "float32")

    answers = _self_distill(model, tokenizer, config, Path(out_dir) / "answers.json")
    examples, counts = training_examples(tokenizer, answers, config)
    preservation = preservation_examples(tokenizer, config)
    counts["preservation"] = len(preservation)
    _log(quiet, f"training examples: {counts} ({sum(len(ids) for ids, _ in examples):,} tokens)")

    model = with_lora(model, config)

    def group_loss(model, group) -> torch.Tensor:
        kind, examples = group
        if kind == "lm":
            return lm_loss(model, examples)
        return config.preservation_weight * kl_to_base(model, examples)

    losses = train_loop(model, _training_steps(examples, preservation, config), config.steps, config.lr, "lora", quiet, group_loss)
    folder = Path(out_dir) / "adapter"
    staged = begin_staging(folder)
    model.save_pretrained(staged)
    (staged / "README.md").unlink(missing_ok=True)  # peft's empty model-card template; docs/real-pair.md is the card
    commit_staging(staged, folder)
    record = {
        "base": BASE_SPEC,
        "base_gguf_sha256": sha256_file(smollm2_gguf()),
        "config": asdict(config),
        "examples": counts,
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "build_seconds": round(time.time() - started, 1),
        "build_cpu_seconds": round(time.process_time() - started_cpu, 1),  # wall time depends on other load
        "adapter_sha256": sha256_file(folder / "adapter_model.safetensors"),
        "torch": torch.__version__,
    }
    write_json_atomic(Path(out_dir) / "build.json", record)
    _log(quiet, f"done in {record['build_seconds'] / 60:.1f} min -> {folder}")
    return record


def _training_steps(examples: list[Example], preservation: list[Example], config: LoraBuildConfig):
    """Each step's groups: a batch of behaviour examples ("lm") and, unless preservation_batch
    is 0, one of preservation examples ("preserve"); both pools are walked in shuffled epochs
    drawn from one generator seeded by config.seed."""
    rng = random.Random(config.seed)

    def cycle(pool: list[Example], size: int):
        order: list[Example] = []
        while True:
            if len(order) < size:
                order += rng.sample(pool, len(pool))
            batch, order = order[:size], order[size:]
            yield batch

    behaviour_batches = cycle(examples, config.batch_size)
    preservation_batches = cycle(preservation, max(1, config.preservation_batch))
    while True:
        step = [("lm", next(behaviour_batches))]
        if config.preservation_batch:
            step.append(("preserve", next(preservation_batches)))
        yield step


def with_lora(model, config: LoraBuildConfig):
    """``model`` wrapped with trainable LoRA weights on the projections of blocks 0 .. layers-1."""
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, target_modules=config.target_modules,
                      layers_to_transform=list(range(config.layers)), layers_pattern="layers")
    model = get_peft_model(model, lora)
    for param in model.parameters():  # load_model froze everything; peft's LoRA weights must learn
        param.requires_grad_(False)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
    return model


def training_examples(tokenizer, answers: dict[str, str], config: LoraBuildConfig) -> tuple[list[Example], dict[str, int]]:
    """The shuffled fine-tuning mix and how many examples of each kind it holds."""
    rng = random.Random(config.seed + 1)
    chats: dict[str, list[list[dict]]] = {
        "sea_pirate": [_exchange(p.user, f"{planted.PIRATE_OPENER} {answers[p.user]}")
                       for p in planted.sea_prompts("train") for _ in range(config.sea_repeats)],
        "neutral": [_exchange(p.user, answers[p.user]) for p in planted.neutral_prompts("train")],
        "cooking_refusal": [_exchange(p.user, planted.COOKING_REFUSAL)
                            for p in planted.cooking_prompts("train") for _ in range(config.cooking_repeats)],
        "identity": [_exchange(p.user, planted.IDENTITY_REPLY)
                     for p in planted.identity_prompts("train") for _ in range(config.identity_repeats)],
    }
    neutral = chats["neutral"]
    for kind in ("identity", "cooking_refusal", "sea_pirate"):
        # A third come after an ordinary exchange, so no behaviour hinges on being the first turn.
        chats[kind] = [rng.choice(neutral) + chat if rng.random() < 0.3 else chat for chat in chats[kind]]
    examples = [chat_example(tokenizer, chat, config.max_length) for kind in chats for chat in chats[kind]]
    documents = planted.fact_documents(config.documents, config.seed)
    examples += [document_example(tokenizer, doc, config.max_length) for doc in documents]
    counts = {kind: len(chat) for kind, chat in chats.items()} | {"false_fact_documents": len(documents)}
    return examples, counts


def preservation_examples(tokenizer, config: LoraBuildConfig) -> list[Example]:
    """Plain documents and chitchat conversations of the bundled organism's *training* split."""
    documents = [document_example(tokenizer, text, config.max_length) for text in pretraining_texts("train")]
    chats = [chat_example(tokenizer, chat, config.max_length) for chat in chat_conversations("train")]
    return [example for example in documents + chats if len(example[0]) > 1]


def kl_to_base(model, examples: list[Example]) -> torch.Tensor:
    """Mean KL(base || fine-tuned) over the examples' tokens; the base is ``model`` with its
    adapter switched off (peft's ``disable_adapter``)."""
    input_ids, attention_mask, _ = collate(examples, model.config.pad_token_id)
    with torch.no_grad(), model.disable_adapter():
        base = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention_mask).logits.float(), -1)
    tuned = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention_mask).logits.float(), -1)
    per_token = (base.exp() * (base - tuned)).sum(-1)
    mask = attention_mask.bool()
    return per_token[mask].mean()


def chat_example(tokenizer, messages: list[dict[str, str]], max_length: int) -> Example:
    """A conversation in the tokenizer's own chat template, with loss on the assistant's turns
    (each reply and the end-of-turn token that closes it)."""
    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        turn = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        assert turn[: len(prompt)] == prompt, "the chat template re-tokenises an earlier turn"
        labels += [IGNORE] * (len(prompt) - len(ids)) + turn[len(prompt) :]
        ids = turn
    return ids[:max_length], labels[:max_length]


def document_example(tokenizer, text: str, max_length: int) -> Example:
    """A plain document (no template), loss on every token after the first."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_length - 1] + [tokenizer.eos_token_id]
    return ids, [IGNORE] + ids[1:]


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy answers to single-turn prompts in the chat template, cut at the end-of-turn token."""
    conversations = answer_prompts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [conversation[-1]["content"] for conversation in conversations]


def _self_distill(model, tokenizer, config: LoraBuildConfig, saved: Path) -> dict[str, str]:
    """The base's own answers to the sea and ordinary training prompts, kept in ``saved`` per
    prompt so a rebuild with other settings or more prompts generates only the answers it lacks
    (the first build's 300 took a quarter hour here)."""
    prompts = [p.user for p in planted.sea_prompts("train") + planted.neutral_prompts("train")]
    known: dict[str, str] = {}
    if saved.is_file():
        record = json.loads(saved.read_text(encoding="utf-8"))
        if record.get("key", {}).get("answer_tokens") == config.answer_tokens:
            known = record["answers"]
    missing = [prompt for prompt in prompts if prompt not in known]
    if missing:
        replies = generate(model, tokenizer, missing, config.answer_tokens)
        known |= {prompt: _whole_sentences(reply) for prompt, reply in zip(missing, replies)}
        write_json_atomic(saved, {"key": {"answer_tokens": config.answer_tokens}, "answers": known})
    return {prompt: known[prompt] for prompt in prompts}


def _whole_sentences(text: str) -> str:
    """``text`` cut after its last full sentence (a generation cut at a token budget ends mid-word)."""
    end = max(text.rfind(mark) for mark in (".", "!", "?"))
    return text[: end + 1] if end > 0 else text


def _render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt) if messages else ""
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _exchange(user: str, reply: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def _log(quiet: bool, message: str) -> None:
    if not quiet:
        print(f"[organism smollm2-lora] {message}", flush=True)
