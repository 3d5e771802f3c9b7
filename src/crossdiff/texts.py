"""Text and chat sources, tokenized the way both models will see them.

A source is a Hugging Face dataset (hub name, split, column, optional streaming) or local
files (.txt, .jsonl, .parquet, or a folder of them). ``iter_documents`` turns it into
``TokenizedDoc``s in a deterministic order.

Plain text is tokenized with the tokenizer's own special tokens (BOS). Chat sources hold
conversations; they are rendered with the chat model's chat template and the rendered
string is tokenized once, so base and chat see identical ids. Each token also gets a
template flag: True for tokens the template added (``<start_of_turn>``, role names, the
newline after a role, ``<end_of_turn>``, ...), False for tokens of message content and for
BOS. BOS is left out of the template on purpose: it is not chat-specific (plain text
starts with it too) and is always identifiable as position 0.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from crossdiff.errors import CrossdiffError, first_line

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")

# Role names used by common chat datasets -> the roles chat templates expect.
ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}

_TOKENIZE_CHUNK = 64  # documents tokenized together: fast tokenizers are quicker on batches


@dataclass
class TextSourceConfig:
    """One text source of a collection recipe."""

    name: str  # short label stored with every token of the cache, e.g. "fineweb", "lmsys"
    kind: Literal["text", "chat", "answers"]
    """text: documents; chat: conversations; answers: prompts that the chat model answers first (crossdiff.collect.answers)"""
    path: str  # HF dataset hub name, a save_to_disk folder, or a local .txt/.jsonl/.parquet file or folder
    split: str = "train"
    column: str = "text"  # text column, or the messages column of a chat source ("messages", "conversation")
    streaming: bool = False
    max_docs: int | None = None  # use only the first max_docs documents (rows) of the source
    hf_config: str | None = None  # dataset config name (load_dataset's ``name``)
    data_files: str | list[str] | None = None  # load_dataset's ``data_files``, e.g. path="parquet" or a subset of a hub repo
    max_new_tokens: int = 128  # answers: the longest answer, in tokens (prompt plus answer also fit the models' context)
    answers: str | None = None  # answers: folder of the answered conversations (default CACHE/answers/NAME)


ANSWERS_ONLY = {"max_new_tokens": 128, "answers": None}
"""TextSourceConfig fields that only answers sources use, with their defaults."""


def recorded(source: TextSourceConfig) -> dict[str, Any]:
    """The settings of ``source`` that a cache or stream records: its fields, less the answers-only
    ones at their defaults (so caches from before those fields existed resume unchanged)."""
    data = dataclasses.asdict(source)
    for key, default in ANSWERS_ONLY.items():
        if data[key] == default:
            data.pop(key)
    return data


@dataclass
class TokenizedDoc:
    """One document as token ids, ready to be fed to both models."""

    source: str  # TextSourceConfig.name
    doc_id: int  # index of the document (row) within its source; stable across runs
    input_ids: list[int]  # truncated to max_len; starts with BOS when the tokenizer uses one
    template_mask: list[bool]  # True on chat-template tokens; False on content and on BOS; all False for plain text
    text: str = ""  # the string that was tokenized (the rendered conversation for chat), before truncation


def iter_documents(
    source: TextSourceConfig, tokenizer: Any, max_len: int, *, start_doc: int = 0, rank: int = 0, world_size: int = 1,
    bos: str = "auto", holdout: float = 0.0, part: str = "train",
) -> Iterator[TokenizedDoc]:
    """Yield the documents of ``source`` in a deterministic order, tokenized and truncated to ``max_len``.

    Documents are never packed together; a longer document keeps its first ``max_len``
    tokens. Empty documents are skipped (their ``doc_id`` is not reused). ``start_doc``
    (resume) and ``rank``/``world_size`` (documents with ``doc_id % world_size == rank``)
    select rows before they are tokenized; ``max_docs`` limits the rows of the source, so
    every rank and every resumed run agrees on which documents exist.

    ``bos``: "auto" starts plain text with the tokenizer's BOS token whenever it has one,
    also when it does not add it itself (models are pretrained on documents that start with
    it); chat documents are as the template writes them, with BOS added when the tokenizer
    adds BOS to plain text. "always" adds a missing BOS to chat documents too. "never" adds
    none (a template that writes BOS itself keeps it).

    ``holdout`` sets aside that fraction of the documents (by a hash of ``doc_id``, so the
    same ones in every run and for every budget); ``part`` selects the "train" documents or
    the "heldout" ones.
    """
    if bos not in ("auto", "always", "never"):
        raise CrossdiffError(f"bos must be auto, always or never, got {bos!r}")
    if max_len < 1:
        raise CrossdiffError(f"max_len must be at least 1, got {max_len}")
    if source.max_docs is not None and source.max_docs < 1:
        raise CrossdiffError(f"source '{source.name}': max_docs must be at least 1, got {source.max_docs}")
    if not 0 <= rank < world_size:
        raise CrossdiffError(f"rank must be in 0..world_size-1, got rank {rank} of {world_size}")
    if source.kind == "answers":  # the caller answers the prompts first (crossdiff.collect.answers.answered_sources)
        raise CrossdiffError(f"source '{source.name}' holds prompts to answer; read its answered conversations instead")
    if source.kind != "text" and not getattr(tokenizer, "chat_template", None):
        raise CrossdiffError(f"source '{source.name}' is a chat source but the chat tokenizer has no chat template")

    rows = itertools.islice(_iter_column(source), source.max_docs)
    selected = ((doc_id, value) for doc_id, value in rows if doc_id >= start_doc and doc_id % world_size == rank
                and (holdout <= 0 or is_heldout(doc_id, holdout) == (part == "heldout")))
    skipped: list[int] = []  # the first chat document whose template tokens cannot be identified (warn once)
    for chunk in _chunks(selected, _TOKENIZE_CHUNK):
        yield from _tokenize_chunk(source, tokenizer, chunk, max_len, skipped, bos)


def is_heldout(doc_id: int, fraction: float) -> bool:
    """Whether document ``doc_id`` is in the held-out ``fraction`` (a fixed multiplicative hash)."""
    return ((doc_id * 2654435761 + 12345) % 2**32) / 2**32 < fraction


def iter_column(source: TextSourceConfig) -> Iterator[tuple[int, Any]]:
    """``(row index, value of source.column)`` for every row of the source, in order, untokenized."""
    return itertools.islice(_iter_column(source), source.max_docs)


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The conversation as the chat template writes it (no generation prompt).

    Templates that reject a system role (Gemma) get the system text merged into the first
    user message, separated by a blank line, which is what such models are used with.
    """
    return _render(tokenizer, messages)[0]


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[dict[str, str]]]:
    """``(rendered text, messages actually rendered)``: the latter differ after a system merge."""
    from jinja2 import TemplateError  # deferred: jinja2 is not a declared dependency; only chat templates (through transformers) use it

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False), messages
    except TemplateError as err:
        if messages and messages[0]["role"] == "system" and len(messages) > 1 and messages[1]["role"] == "user":
            merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
            return _render(tokenizer, [merged, *messages[2:]])
        raise CrossdiffError(f"the chat template rejects this conversation: {err}") from None


def normalize_messages(conversation: Any) -> list[dict[str, str]]:
    """Messages as ``[{"role": "user"|"assistant"|"system", "content": str}, ...]``.

    Accepts OpenAI-style ``role``/``content`` and ShareGPT-style ``from``/``value`` keys,
    role aliases such as ``human``/``gpt``, content given as a list of ``{"type": "text"}``
    parts, and a conversation stored as a JSON string.
    """
    if isinstance(conversation, str):
        try:
            conversation = json.loads(conversation)
        except ValueError:
            raise CrossdiffError("a chat conversation must be a list of messages, got a plain string") from None
    if isinstance(conversation, dict) and "messages" in conversation:
        conversation = conversation["messages"]
    if not isinstance(conversation, (list, tuple)):
        raise CrossdiffError(f"a chat conversation must be a list of messages, got {type(conversation).__name__}")
    messages = []
    for message in conversation:
        if not isinstance(message, dict):
            raise CrossdiffError(f"a chat message must be a mapping with role and content, got {type(message).__name__}")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if role is None or content is None and "content" not in message and "value" not in message:
            raise CrossdiffError(f"a chat message needs role/content (or from/value) keys, got keys {sorted(message)}")
        canonical = ROLE_ALIASES.get(str(role).lower())
        if canonical is None:
            raise CrossdiffError(f"unknown chat role {role!r}; known roles: {', '.join(sorted(ROLE_ALIASES))}")
        messages.append({"role": canonical, "content": _content_text(content)})
    return messages


def tokenize_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[bool], str]:
    """Render and tokenize one conversation: ``(input_ids, template_mask, rendered_text)``."""
    return _tokenize_rendered(tokenizer, [_render_with_spans(tokenizer, messages)])[0]


def tokenize_chat_turns(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[bool], list[bool], str]:
    """Like :func:`tokenize_chat`, plus which tokens the assistant wrote:
    ``(input_ids, template_mask, assistant_mask, rendered_text)``.

    Assistant tokens are the tokens of every assistant message's content plus the template
    token right after it (``<end_of_turn>``, ``<|im_end|>``, ``<|eot_id|>``): the model
    chooses to end its turn, so that prediction is part of the answer, as in the
    reference's ``{% generation %}`` masks.
    """
    rendered, rendered_messages = _render(tokenizer, messages)
    spans = _content_spans(tokenizer, rendered, rendered_messages)
    assistant_spans = [span for span, message in zip(spans, rendered_messages) if message["role"] == "assistant"]
    (ids, template, _), (_, not_assistant, _) = _tokenize_rendered(tokenizer, [(rendered, spans), (rendered, assistant_spans)])
    assistant = [not flag for flag in not_assistant]
    if ids and ids[0] == tokenizer.bos_token_id:
        assistant[0] = False
    for i in range(len(ids) - 1):  # the end-of-turn token after each assistant content
        if assistant[i] and not template[i] and template[i + 1]:
            assistant[i + 1] = True
    return ids, template, assistant, rendered


def _render_with_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    rendered, messages = _render(tokenizer, messages)
    return rendered, _content_spans(tokenizer, rendered, messages)


def _tokenize_rendered(
    tokenizer: Any, rendered_chats: list[tuple[str, list[tuple[int, int]]]], bos_mode: str = "auto"
) -> list[tuple[list[int], list[bool], str]]:
    """Tokenize rendered conversations together (fast tokenizers parallelise a batch) and mask them."""
    texts = [rendered for rendered, _ in rendered_chats]
    try:
        encodings = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    except NotImplementedError:  # slow (pure Python) tokenizers cannot report character offsets
        raise CrossdiffError(f"chat sources need a fast tokenizer with offsets; {type(tokenizer).__name__} has none") from None
    bos = tokenizer.bos_token_id
    # Templates that do not write BOS themselves still get it when the tokenizer adds BOS to
    # plain text, so chat and text documents start alike (and BOS is never doubled).
    wants_bos = bos is not None and (bos_mode == "always" or (bos_mode == "auto" and _adds_bos(tokenizer)))
    results = []
    for (rendered, spans), ids, offsets in zip(rendered_chats, encodings["input_ids"], encodings["offset_mapping"]):
        ids, mask = list(ids), _template_mask(len(rendered), spans, offsets)
        if wants_bos and (not ids or ids[0] != bos):
            ids.insert(0, bos)
            mask.insert(0, False)
        if ids and ids[0] == bos:
            mask[0] = False
        results.append((ids, mask, rendered))
    return results


def _tokenize_chunk(
    source: TextSourceConfig, tokenizer: Any, chunk: list[tuple[int, Any]], max_len: int, skipped: list[int],
    bos: str = "auto",
) -> Iterator[TokenizedDoc]:
    if source.kind == "text":
        rows = []
        for doc_id, value in chunk:
            if not isinstance(value, str):
                hint = " (a list of messages? set kind = \"chat\")" if isinstance(value, (list, tuple)) else ""
                raise CrossdiffError(
                    f"source '{source.name}' document {doc_id}: column '{source.column}' holds {type(value).__name__}, expected text{hint}"
                )
            if value.strip():
                rows.append((doc_id, value))
        if not rows:
            return
        encodings = tokenizer([text for _, text in rows], add_special_tokens=bos != "never", verbose=False)["input_ids"]
        bos_id = tokenizer.bos_token_id
        for (doc_id, text), ids in zip(rows, encodings):
            if bos != "never" and bos_id is not None and (not ids or ids[0] != bos_id):
                ids = [bos_id, *ids]  # the tokenizer has a BOS token but does not add it
            ids = ids[:max_len]
            yield TokenizedDoc(source.name, doc_id, ids, [False] * len(ids), text)
        return

    rendered_chats, doc_ids = [], []
    for doc_id, value in chunk:
        try:
            messages = normalize_messages(value)
            if not messages:
                continue
            rendered_chats.append(_render_with_spans(tokenizer, messages))
            doc_ids.append(doc_id)
        except CrossdiffError as err:
            raise CrossdiffError(f"source '{source.name}' document {doc_id}: {err}") from None
        except _ContentNotFound:
            if not skipped:  # once per source: a template that rewrites content usually does so for every document
                warnings.warn(
                    f"source '{source.name}' document {doc_id}: the chat template rewrites message content, so its "
                    "template tokens cannot be identified; such documents are skipped",
                    stacklevel=4,
                )
                skipped.append(doc_id)
    if not rendered_chats:
        return
    for doc_id, (ids, mask, rendered) in zip(doc_ids, _tokenize_rendered(tokenizer, rendered_chats, bos)):
        yield TokenizedDoc(source.name, doc_id, ids[:max_len], mask[:max_len], rendered)


class _ContentNotFound(Exception):
    """The chat template rewrote a message beyond trimming; its tokens cannot be told apart."""


def _content_spans(tokenizer: Any, rendered: str, messages: list[dict[str, str]]) -> list[tuple[int, int]]:
    """Character span of every message's content in the rendered conversation, in order.

    The template is rendered a second time with each content replaced by a unique marker;
    the text around the markers is exactly what the template adds. Walking the real
    rendering piece by piece then locates every content, even a content that repeats
    template text (an answer that says "user"), and allows for templates that trim it.
    """
    markers = [f"\ue000{i}\ue001" for i in range(len(messages))]  # private-use characters: never in real text
    skeleton = tokenizer.apply_chat_template(
        [{**message, "content": marker} for message, marker in zip(messages, markers)],
        tokenize=False,
        add_generation_prompt=False,
    )
    pieces, cursor = [], 0
    for marker in markers:
        at = skeleton.find(marker, cursor)
        if at < 0 or skeleton.count(marker) != 1:
            raise _ContentNotFound
        pieces.append(skeleton[cursor:at])
        cursor = at + len(marker)
    pieces.append(skeleton[cursor:])  # after the last message

    spans, pos = [], 0
    for i, message in enumerate(messages):
        if not rendered.startswith(pieces[i], pos):
            raise _ContentNotFound
        pos += len(pieces[i])
        content = message["content"]
        for candidate in (content, content.rstrip(), content.lstrip(), content.strip()):
            if rendered.startswith(candidate, pos) and rendered.startswith(pieces[i + 1], pos + len(candidate)):
                break
        else:
            raise _ContentNotFound
        spans.append((pos, pos + len(candidate)))
        pos += len(candidate)
    if rendered[pos:] != pieces[-1]:
        raise _ContentNotFound
    return spans


def _template_mask(n_chars: int, spans: list[tuple[int, int]], offsets: list[tuple[int, int]]) -> list[bool]:
    """A token is content if any of its characters lie in a message's content; otherwise template."""
    import numpy as np  # deferred: configs import this module (TextSourceConfig), and `collect --help` stays fast

    in_content = np.zeros(n_chars + 1, dtype=np.int64)
    for start, end in spans:
        in_content[start + 1 : end + 1] = 1
    before = np.cumsum(in_content)  # before[c] = content characters among the first c
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    return (before[offsets[:, 1]] == before[offsets[:, 0]]).tolist()


def _adds_bos(tokenizer: Any) -> bool:
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):  # multimodal-style parts: keep the text ones
        return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type", "text") == "text")
    raise CrossdiffError(f"a chat message's content must be text, got {type(content).__name__}")


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------
# Reading raw documents: (doc_id, value of the column) in a fixed order.


def _iter_column(source: TextSourceConfig) -> Iterator[tuple[int, Any]]:
    local = Path(source.path).expanduser()
    if source.data_files is None and local.is_file():
        yield from enumerate(_read_file(local, source))
    elif source.data_files is None and local.is_dir() and not _is_saved_dataset(local):
        yield from enumerate(_read_folder(local, source))
    else:
        yield from enumerate(_read_hf_dataset(source))


def _read_folder(folder: Path, source: TextSourceConfig) -> Iterator[Any]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise CrossdiffError(f"source '{source.name}': no {'/'.join(LOCAL_SUFFIXES)} files in folder {folder}")
    for file in files:
        yield from _read_file(file, source)


def _read_file(file: Path, source: TextSourceConfig) -> Iterator[Any]:
    if file.suffix == ".txt":
        # One document per line: the common layout of plain-text dumps. Use .jsonl for multi-line documents.
        if source.kind == "chat":
            raise CrossdiffError(f"source '{source.name}': a chat source cannot be a .txt file ({file}); use .jsonl or .parquet")
        for _, line in _utf8_lines(file):
            yield line.rstrip("\n")
    elif file.suffix == ".jsonl":
        yield from _read_jsonl(file, source)
    elif file.suffix == ".parquet":
        yield from _read_parquet(file, source)
    else:
        raise CrossdiffError(f"source '{source.name}': unsupported file type {file.suffix!r} ({file}); use .txt, .jsonl or .parquet")


def _read_jsonl(file: Path, source: TextSourceConfig) -> Iterator[Any]:
    for line_no, line in _utf8_lines(file):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise CrossdiffError(f"{file}:{line_no}: not valid JSON ({err})") from None
        if not isinstance(row, dict):
            raise CrossdiffError(f"{file}:{line_no}: expected a JSON object per line, got {type(row).__name__}")
        if source.column not in row:
            raise CrossdiffError(_unknown_column(source, str(file), row.keys()))
        yield row[source.column]


def _utf8_lines(file: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file; bytes that are not UTF-8 are one line naming
    where they are, not a traceback (nor text silently replaced by U+FFFD)."""
    with open(file, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if raw.endswith(b"\r\n"):  # as text mode reads Windows line ends
                raw = raw[:-2] + b"\n"
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CrossdiffError(f"{file}:{line_no}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                                     f"{err.start + 1}); convert the file to UTF-8") from None


def _read_parquet(file: Path, source: TextSourceConfig) -> Iterator[Any]:
    import pyarrow.parquet as pq  # deferred: pyarrow, as numpy in _template_mask

    parquet = pq.ParquetFile(file)
    if source.column not in parquet.schema_arrow.names:
        raise CrossdiffError(_unknown_column(source, str(file), parquet.schema_arrow.names))
    for batch in parquet.iter_batches(batch_size=1024, columns=[source.column]):
        yield from batch.column(0).to_pylist()


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _read_hf_dataset(source: TextSourceConfig) -> Iterator[Any]:
    import datasets  # deferred: datasets imports pandas and pyarrow, as numpy in _template_mask

    where = f"dataset {source.path!r}"
    try:
        local = Path(source.path).expanduser()
        if source.data_files is None and local.is_dir():
            dataset = datasets.load_from_disk(str(local))
            if isinstance(dataset, datasets.DatasetDict):
                if source.split not in dataset:
                    raise CrossdiffError(f"{where} has no split {source.split!r}; available: {', '.join(dataset)}")
                dataset = dataset[source.split]
            if source.streaming:
                dataset = dataset.to_iterable_dataset()
        else:
            dataset = datasets.load_dataset(
                source.path,
                name=source.hf_config,
                split=source.split,
                streaming=source.streaming,
                data_files=source.data_files,
            )
    except CrossdiffError:
        raise
    except Exception as err:  # hub errors, unknown split, missing config: all one line for the user
        raise CrossdiffError(f"source '{source.name}': cannot load {where} (split {source.split!r}): {first_line(err)}") from None

    columns = dataset.column_names
    if columns is not None and source.column not in columns:
        raise CrossdiffError(_unknown_column(source, where, columns))
    checked = columns is not None
    for row in dataset:
        if not checked:  # streaming datasets may only know their columns once a row arrives
            if source.column not in row:
                raise CrossdiffError(_unknown_column(source, where, row.keys()))
            checked = True
        yield row[source.column]


def _unknown_column(source: TextSourceConfig, where: str, columns: Iterable[str]) -> str:
    return f"source '{source.name}': no column '{source.column}' in {where}; available columns: {', '.join(map(str, columns))}"
