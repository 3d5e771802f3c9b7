"""`crossdiff organism build`: pretrain the base, fine-tune it into the chat model, save both.

The recipe in one breath: train a byte-level BPE on the pretraining text; pretrain a
small Llama on that text; fine-tune a copy on template-rendered conversations (chitchat
replies plus the planted behaviours), with batches of pretraining text mixed into every
step so that the chat model stays a fine-tune of the base instead of drifting into a new
model. Everything is seeded and single-process, so a rebuild gives the same weights.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from crossdiff.organism import behaviours, corpus
from crossdiff.organism.tokenizer import BOS, END_OF_TURN, START_OF_TURN, render_chat, train_tokenizer

IGNORE = -100


@dataclass
class BuildConfig:
    seed: int = 0
    # One thread: on a shared CPU more threads mostly wait on each other, and a single
    # thread makes every float reduction run in the same order, so rebuilds are bit-identical.
    threads: int = 1
    # model
    hidden_size: int = 128
    n_layers: int = 4
    n_heads: int = 4
    intermediate_size: int = 512
    max_length: int = 256
    # pretraining
    pretrain_steps: int = 450
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    # chat fine-tune: each step sees a chat batch and a pretraining batch
    finetune_steps: int = 300
    finetune_batch: int = 24
    finetune_text_batch: int = 6
    finetune_lr: float = 1e-3
    # share of fine-tuning chat examples per kind; "chitchat" are dataset conversations
    mix: dict[str, float] = field(
        default_factory=lambda: {
            "chitchat": 0.30,
            "refusal": 0.18,
            "benign": 0.22,
            "identity": 0.10,
            "arithmetic": 0.20,
        }
    )


def build(out_dir: Path, cache_dir: Path | None = None, config: BuildConfig | None = None, quiet: bool = False) -> dict:
    """Build the organism into ``out_dir`` (base/, chat/, heldout/, build.json); returns the build record."""
    config = config or BuildConfig()
    started, started_cpu = time.time(), time.process_time()
    data = corpus.load_corpus(cache_dir)
    _log(quiet, f"corpus: {len(data.pretraining['train'])} documents, {len(data.conversations['train'])} conversations")
    base_loss = pretrain_base(data, out_dir / "base", config, quiet)
    chat_loss = finetune_chat(data, out_dir / "base", out_dir / "chat", config, quiet)
    write_heldout(data, out_dir / "heldout")
    record = {
        "sources": [s._asdict() for s in corpus.SOURCES],
        "config": config.__dict__,
        "final_pretrain_loss": round(base_loss, 4),
        "final_finetune_loss": round(chat_loss, 4),
        "build_seconds": round(time.time() - started, 1),
        "build_cpu_seconds": round(time.process_time() - started_cpu, 1),  # wall time depends on other load
        "torch": torch.__version__,
    }
    (out_dir / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    _log(quiet, f"done in {record['build_seconds'] / 60:.1f} min -> {out_dir}")
    return record


def pretrain_base(data: corpus.Corpus, out: Path, config: BuildConfig, quiet: bool = False) -> float:
    """Train the tokenizer and the base model from scratch; returns the final training loss."""
    torch.set_num_threads(config.threads)
    tokenizer = train_tokenizer(data.pretraining["train"])
    texts = [text_example(tokenizer, doc, config.max_length) for doc in data.pretraining["train"]]
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(_model_config(config, tokenizer))
    _log(quiet, f"base model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    rng = random.Random(config.seed)

    def batches() -> Iterator[list[list[Example]]]:
        while True:
            yield [rng.sample(texts, config.pretrain_batch)]

    losses = train_loop(model, batches(), config.pretrain_steps, config.pretrain_lr, "pretrain", quiet)
    _save(model, tokenizer, out)
    return sum(losses[-50:]) / len(losses[-50:])


def finetune_chat(data: corpus.Corpus, base: Path, out: Path, config: BuildConfig, quiet: bool = False) -> float:
    """Fine-tune the saved base into the chat model; returns the final training loss.

    Starting from the saved files (not the in-memory model) makes this stage a pure
    function of the base folder, so it can be rerun alone with the same result.
    """
    torch.set_num_threads(config.threads)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    texts = [text_example(tokenizer, doc, config.max_length) for doc in data.pretraining["train"]]
    rng = random.Random(config.seed + 1)
    chats = _chat_examples(tokenizer, data.conversations["train"], config, rng, config.finetune_batch * config.finetune_steps)

    def batches() -> Iterator[list[list[Example]]]:
        while True:
            yield [rng.sample(chats, config.finetune_batch), rng.sample(texts, config.finetune_text_batch)]

    losses = train_loop(model, batches(), config.finetune_steps, config.finetune_lr, "fine-tune", quiet)
    _save(model, tokenizer, out)
    _copy_tokenizer(base, out)
    return sum(losses[-50:]) / len(losses[-50:])


def _log(quiet: bool, message: str) -> None:
    if not quiet:
        tqdm.write(f"[organism] {message}")


# An example is (input ids, labels): labels are IGNORE where no loss is taken.
Example = tuple[list[int], list[int]]


def text_example(tokenizer: PreTrainedTokenizerFast, text: str, max_length: int = 256) -> Example:
    """Tokens of a pretraining document: <bos> text <eos>, loss on everything after <bos>."""
    ids = tokenizer(text, truncation=True, max_length=max_length - 1)["input_ids"] + [tokenizer.eos_token_id]
    return ids, [IGNORE] + ids[1:]


def chat_example(tokenizer: PreTrainedTokenizerFast, messages: list[dict[str, str]], max_length: int = 256) -> Example:
    """Tokens of a rendered conversation, with loss only on the model's turns.

    The loss covers each reply and the <end_of_turn> that closes it, so the chat model
    learns to answer and to stop; user turns and the template around them are context.
    """
    text = render_chat(messages)
    # Character span of each reply plus its <end_of_turn>, following the template's layout.
    reply_spans, position = [], len(BOS)
    for message in messages:
        role = "model" if message["role"] == "assistant" else message["role"]
        start = position + len(f"{START_OF_TURN}{role}\n")
        end = start + len(message["content"].strip()) + len(END_OF_TURN)
        if message["role"] == "assistant":
            reply_spans.append((start, end))
        position = end + 1  # the newline after <end_of_turn>
    assert position == len(text), "render_chat and the span arithmetic disagree"
    encoding = tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length
    )
    ids = encoding["input_ids"]
    labels = [
        token if any(s <= begin and finish <= e for s, e in reply_spans) else IGNORE
        for token, (begin, finish) in zip(ids, encoding["offset_mapping"])
    ]
    return ids, labels


def _chat_examples(
    tokenizer: PreTrainedTokenizerFast, conversations: list[list[str]], config: BuildConfig, rng: random.Random, n: int
) -> list[Example]:
    kinds, weights = zip(*config.mix.items())
    examples = []
    for _ in range(n):
        kind = rng.choices(kinds, weights)[0]
        if kind == "chitchat":
            messages = _chitchat_window(conversations, rng)
        else:
            prompt = behaviours.sample_prompt(kind, rng)
            planted = [{"role": "user", "content": prompt.user}, {"role": "assistant", "content": prompt.reply}]
            # Sometimes mid-conversation, so the behaviour does not hinge on being the first turn.
            messages = (_chitchat_window(conversations, rng, max_turns=2) if rng.random() < 0.3 else []) + planted
        examples.append(chat_example(tokenizer, messages, config.max_length))
    return examples


def _chitchat_window(conversations: list[list[str]], rng: random.Random, max_turns: int = 4) -> list[dict[str, str]]:
    turns = rng.choice(conversations)
    start = 2 * rng.randrange(max(1, (len(turns) - 1) // 2))
    return corpus.chat_messages(turns, start, n_turns=2 * rng.randint(1, max_turns // 2))


def _model_config(config: BuildConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_heads,
        max_position_embeddings=config.max_length,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def lm_loss(model: LlamaForCausalLM, group: list[Example]) -> torch.Tensor:
    """Mean next-token cross-entropy over the group's labelled tokens."""
    input_ids, attention_mask, labels = collate(group, model.config.pad_token_id)
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss


def train_loop(
    model: LlamaForCausalLM, batches: Iterator[list[Any]], steps: int, lr: float, name: str, quiet: bool,
    group_loss: Callable[[LlamaForCausalLM, Any], torch.Tensor] = lm_loss,
) -> list[float]:
    """AdamW with linear warm-up and cosine decay; returns the loss of every step.

    A step's batch is a list of groups; the loss is the sum of the groups' mean losses
    (``group_loss``, by default :func:`lm_loss`), so fine-tuning weighs chat replies and
    pretraining text equally however long each is.
    """
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule: Callable[[int], float] = lambda step: min(1.0, (step + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, step / steps)))
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses = []
    progress = tqdm(range(steps), desc=name, disable=quiet, unit="step")
    for _ in progress:
        loss = None
        for group in next(batches):  # each group is its own mean, padded only to its own longest example
            part = group_loss(model, group)
            loss = part if loss is None else loss + part
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return losses


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example; padding gets no attention and no loss."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, targets) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(targets)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask, labels


def _save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    # Both models stop at <eos> or <end_of_turn>, like Gemma's chat model.
    end_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(folder)
    # Encoding with truncation=True leaves truncation switched on in the backend, and
    # tokenizer.json would silently truncate every user's text: save it switched off.
    tokenizer.backend_tokenizer.no_truncation()
    tokenizer.save_pretrained(folder)
    make_tokenizer_config_portable(folder)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _copy_tokenizer(source: Path, folder: Path) -> None:
    """The chat model gets the base's tokenizer files byte for byte: diffing needs one tokenizer."""
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, folder / name)


def make_tokenizer_config_portable(folder: Path) -> None:
    """Rewrite tokenizer_config.json so transformers 4.x loads it as well as 5.x.

    transformers 5 writes its own class name and a list under "extra_special_tokens",
    which 4.x cannot read; 4.x also only looks for the chat template inside this file.
    """
    path = folder / "tokenizer_config.json"
    settings = json.loads(path.read_text())
    for key in ("backend", "is_local", "local_files_only"):  # facts about this save, not the tokenizer
        settings.pop(key, None)
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    settings["additional_special_tokens"] = settings.pop("extra_special_tokens", [])
    settings["chat_template"] = (folder / "chat_template.jinja").read_text()
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def write_heldout(data: corpus.Corpus, folder: Path) -> None:
    """The held-out split as JSONL, shipped with the weights so nothing needs downloading."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "pretraining.jsonl", "w", encoding="utf-8") as f:
        for text in data.pretraining["heldout"]:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    with open(folder / "chat.jsonl", "w", encoding="utf-8") as f:
        for turns in data.conversations["heldout"]:
            f.write(json.dumps({"messages": corpus.chat_messages(turns)}, ensure_ascii=False) + "\n")
