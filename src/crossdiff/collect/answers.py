"""The chat model's own answers as a collection source (``kind = "answers"``).

A crosscoder learns latents only for what happens at the tokens it is trained on. A
behaviour the chat model shows when it writes (a refusal, a self-description, an answer
format) leaves activations only on text where that behaviour is present; human-written
replies do not contain it, so no latent is needed to reconstruct it and none is learned
(docs/models-and-texts.md, "The chat model's own answers").

A source with ``kind = "answers"`` therefore names prompts (``path``: a .txt file, one per
line, or a jsonl/parquet/dataset ``column`` of strings, or of conversations whose first
user turn is the prompt). Before its texts are read, the chat model answers every usable
prompt greedily (at most ``max_new_tokens``; prompt plus answer within the models'
``max_position_embeddings``), and both models then read the answered conversations as a
chat source. The answers live in the source's ``answers`` folder (default
``CACHE/answers/NAME``)::

    settings.json          what is answered: prompts, column, chat model, max_new_tokens, context (written first)
    part-NNNNNNNN.jsonl    the conversations of usable prompts NNNNNNNN.. (one batch), each written atomically
    complete.json          written last: how many prompts were answered and how many were unusable

A kill at any moment leaves whole parts only; the same command keeps them and answers the
prompts after the last one. Several ranks: rank 0 answers, the others wait for complete.json.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from crossdiff.causal.conversations import answer_prompts, load_prompts, user_prompt_ids
from crossdiff.errors import CrossdiffError
from crossdiff.files import write_json_atomic, write_text_atomic
from crossdiff.locks import output_lock
from crossdiff.models import context_length
from crossdiff.texts import TextSourceConfig

SETTINGS, COMPLETE = "settings.json", "complete.json"
_PART = "part-{:08d}.jsonl"


def answered_sources(config: Any, pair: Any, *, quiet: bool = True) -> list[TextSourceConfig]:
    """``config.sources`` (a CollectConfig's) with every answers source answered (or found
    answered) and replaced by the chat source of its conversations."""
    return [answer_source(config, source, pair, quiet=quiet) if source.kind == "answers" else source
            for source in config.sources]


def answers_folder(config: Any, source: TextSourceConfig) -> Path:
    return Path(source.answers) if source.answers else Path(config.out) / "answers" / source.name


def answer_source(config: Any, source: TextSourceConfig, pair: Any, *, quiet: bool = True) -> TextSourceConfig:
    """Answer ``source``'s prompts with the chat model (resuming) and return the chat source to read."""
    folder = answers_folder(config, source)
    context = context_length(pair.base, pair.chat)
    settings = {"prompts": source.path, "column": source.column, "max_docs": source.max_docs, "chat": str(config.chat),
                "max_new_tokens": source.max_new_tokens, "context": context}
    if config.rank == 0:
        with output_lock(folder, "answers"):
            _check_settings(folder, source, settings)
            if not (folder / COMPLETE).is_file():
                _answer(folder, source, pair, context, batch_size=config.batch_size, quiet=quiet)
    else:
        _wait_for(folder, source, quiet)
    return replace(source, kind="chat", path=str(folder), column="messages", split="train", streaming=False,
                   max_docs=None, hf_config=None, data_files=None)


def usable_prompts(source: TextSourceConfig, tokenizer: Any, context: int | None) -> tuple[list[tuple[int, str]], int]:
    """``([(row, prompt), ...], rows)``: the prompts that are not blank and leave room in the
    context for an answer; one-line error when none is."""
    try:
        prompts = load_prompts(source.path, column=source.column, limit=source.max_docs)
    except CrossdiffError as err:
        raise CrossdiffError(f"source '{source.name}': {err}") from None
    usable = [(row, p) for row, p in enumerate(prompts) if p.strip()
              and (context is None or len(user_prompt_ids(tokenizer, p)) < context)]
    if not usable:
        room = f", or longer than the models' context of {context} tokens" if context else ""
        raise CrossdiffError(f"source '{source.name}': no usable prompt in {source.path} ({len(prompts)} rows, all "
                             f"blank{room}); an answers source needs prompts in column '{source.column}' or one per line of a .txt")
    return usable, len(prompts)


def _answer(folder: Path, source: TextSourceConfig, pair: Any, context: int | None, *, batch_size: int, quiet: bool) -> None:
    for stray in folder.glob("*.tmp"):  # a killed writer's half-written part (we hold the folder's lock)
        stray.unlink(missing_ok=True)
    usable, rows = usable_prompts(source, pair.tokenizer, context)
    done = _answered(folder)
    progress = tqdm(total=len(usable), initial=done, unit="answer", disable=quiet, desc=f"answers {source.name}")
    try:
        for first in range(done, len(usable), batch_size):
            chunk = usable[first:first + batch_size]
            conversations = answer_prompts(pair.chat, pair.tokenizer, [p for _, p in chunk], max_new_tokens=source.max_new_tokens,
                                           batch_size=batch_size, max_len=context)
            lines = [json.dumps({"messages": c, "prompt_row": row}, ensure_ascii=False) + "\n"
                     for (row, _), c in zip(chunk, conversations)]
            write_text_atomic(folder / _PART.format(first), "".join(lines))
            progress.update(len(chunk))
    finally:
        progress.close()
    write_json_atomic(folder / COMPLETE, {"answered": len(usable), "rows": rows, "unusable": rows - len(usable)})
    if not quiet:
        print(f"answers {source.name!r}: the chat model answered {len(usable):,} of {rows:,} prompts"
              f"{f' ({rows - len(usable)} blank or too long)' if rows > len(usable) else ''} -> {folder}", file=sys.stderr)


def _answered(folder: Path) -> int:
    """How many prompts the parts on disk answer (they are contiguous: each starts where the last ended)."""
    answered = 0
    for part in sorted(folder.glob("part-*.jsonl")):
        first = int(part.stem.split("-")[1])
        if first != answered:
            raise CrossdiffError(f"{folder}: {part.name} does not follow the previous part; delete the folder to answer afresh")
        answered += sum(1 for line in part.read_text(encoding="utf-8").splitlines() if line.strip())
    return answered


def _check_settings(folder: Path, source: TextSourceConfig, settings: dict[str, Any]) -> None:
    path = folder / SETTINGS
    if not path.is_file():
        write_json_atomic(path, settings)
        return
    old = json.loads(path.read_text())
    differ = [f"{key}: {old.get(key)!r} there, {value!r} now" for key, value in settings.items() if old.get(key) != value]
    if differ:
        raise CrossdiffError(f"source '{source.name}': {folder} holds answers made with other settings ({'; '.join(differ)}); "
                             "delete it or set the source's answers to another folder")


def _wait_for(folder: Path, source: TextSourceConfig, quiet: bool, poll_s: float = 2.0) -> None:
    if not (folder / COMPLETE).is_file() and not quiet:
        print(f"answers {source.name!r}: waiting for rank 0 to answer the prompts into {folder}", file=sys.stderr)
    while not (folder / COMPLETE).is_file():
        time.sleep(poll_s)
