"""Text and chat sources: readers, tokenization, chat templates and template masks."""

from __future__ import annotations

import json

import pytest

from crossdiff.errors import CrossdiffError
from crossdiff.texts import TextSourceConfig, TokenizedDoc, iter_documents, normalize_messages, tokenize_chat

DOCS = ["The first document.", "A second one, a bit longer than the first.", "Third!"]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How are you?"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "Sure?"},
     {"role": "assistant", "content": "Yes."}],
]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
)


def _tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _text(doc: TokenizedDoc, tokenizer) -> str:
    return tokenizer.decode(doc.input_ids, skip_special_tokens=True)


# --- chat formatting and template masks -------------------------------------------------


def test_template_mask_hand_checked(tiny_tokenizer):
    ids, mask, rendered = tokenize_chat(tiny_tokenizer, CONVERSATIONS[0])
    assert rendered == "<bos><start_of_turn>user\nHello there<end_of_turn>\n<start_of_turn>model\nHi! How are you?<end_of_turn>\n"
    T, F = True, False
    assert list(zip(_tokens(tiny_tokenizer, ids), mask)) == [
        ("<bos>", F),
        ("<start_of_turn>", T), ("user", T), ("Ċ", T),
        ("Hello", F), ("Ġthe", F), ("re", F),
        ("<end_of_turn>", T), ("Ċ", T),
        ("<start_of_turn>", T), ("model", T), ("Ċ", T),
        ("H", F), ("i", F), ("!", F), ("ĠHow", F), ("Ġare", F), ("Ġyou", F), ("?", F),
        ("<end_of_turn>", T), ("Ċ", T),
    ]  # fmt: skip


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_template_and_content_tokens_partition_the_text(tiny_tokenizer, conversation):
    ids, mask, rendered = tokenize_chat(tiny_tokenizer, conversation)
    content = tiny_tokenizer.decode([i for i, m in zip(ids[1:], mask[1:]) if not m])
    template = tiny_tokenizer.decode([i for i, m in zip(ids[1:], mask[1:]) if m])
    assert content == "".join(message["content"] for message in conversation)
    turns = ["user" if m["role"] == "user" else "model" for m in conversation]
    assert template == "".join(f"<start_of_turn>{role}\n<end_of_turn>\n" for role in turns)


def test_same_ids_for_both_models_and_no_double_bos(tiny_model_pairs, tiny_tokenizer):
    from transformers import AutoTokenizer

    base_dir, chat_dir = tiny_model_pairs["gemma2"]
    base_tok, chat_tok = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(chat_dir)
    for conversation in CONVERSATIONS:
        base_ids, base_mask, _ = tokenize_chat(base_tok, conversation)
        chat_ids, chat_mask, rendered = tokenize_chat(chat_tok, conversation)
        assert (base_ids, base_mask) == (chat_ids, chat_mask)
        # What the model itself would be given: apply_chat_template's own tokenization, BOS once.
        reference = chat_tok.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
        assert chat_ids == list(reference)
        assert chat_ids.count(chat_tok.bos_token_id) == 1 and chat_ids[0] == chat_tok.bos_token_id
        assert base_tok(rendered, add_special_tokens=False)["input_ids"] == chat_ids


def test_content_that_repeats_template_text(tiny_tokenizer):
    """An answer that says "model" must not be confused with the role name before it."""
    ids, mask, _ = tokenize_chat(tiny_tokenizer, [{"role": "user", "content": "user"}, {"role": "assistant", "content": "model"}])
    tokens = _tokens(tiny_tokenizer, ids)
    assert [t for t, m in zip(tokens, mask) if not m] == ["<bos>", "user", "model"]
    assert tokens.index("user") == 2 and mask[2]  # the role name is template ...
    assert not mask[4] and tokens[4] == "user"  # ... the same word as content is not


def test_trimmed_content_and_system_merge(tiny_tokenizer):
    """Gemma's template trims content and rejects a system role: system text joins the first user turn."""
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "  Hi!\n"},
    ]
    ids, mask, rendered = tokenize_chat(tiny_tokenizer, conversation)
    assert rendered == "<bos><start_of_turn>user\nBe brief.\n\nHello there<end_of_turn>\n<start_of_turn>model\nHi!<end_of_turn>\n"
    content = tiny_tokenizer.decode([i for i, m in zip(ids[1:], mask[1:]) if not m])
    assert content == "Be brief.\n\nHello thereHi!"


def test_template_with_system_role_and_without_bos(tiny_tokenizer):
    """A ChatML-style template keeps the system turn; BOS is added once, as for plain text."""
    chatml = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    chatml.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    chatml.chat_template = CHATML_TEMPLATE
    conversation = [{"role": "system", "content": "Be brief."}, *CONVERSATIONS[0]]
    ids, mask, rendered = tokenize_chat(chatml, conversation)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert ids[0] == chatml.bos_token_id and not mask[0] and ids.count(chatml.bos_token_id) == 1
    template = chatml.decode([i for i, m in zip(ids, mask) if m])
    assert template == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"


def test_normalize_sharegpt_and_aliases():
    raw = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}, {"role": "Model", "content": [{"type": "text", "text": "a"}, {"type": "image"}]}]
    assert normalize_messages(raw) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "assistant", "content": "a"},
    ]
    assert normalize_messages(json.dumps(raw[:1])) == [{"role": "user", "content": "hi"}]
    with pytest.raises(CrossdiffError, match="unknown chat role 'narrator'"):
        normalize_messages([{"role": "narrator", "content": "x"}])
    with pytest.raises(CrossdiffError, match="needs role/content"):
        normalize_messages([{"speaker": "user", "text": "x"}])


# --- sources ----------------------------------------------------------------------------


def _docs(source, tokenizer, max_len=64):
    return list(iter_documents(source, tokenizer, max_len))


def test_local_formats_agree(tmp_path, tiny_tokenizer):
    (tmp_path / "docs.txt").write_text(DOCS[0] + "\n\n" + DOCS[1] + "\n" + DOCS[2] + "\n")
    _write_jsonl(tmp_path / "docs.jsonl", [{"id": i, "text": d} for i, d in enumerate(DOCS)])
    import pandas as pd

    pd.DataFrame({"text": DOCS, "id": range(3)}).to_parquet(tmp_path / "docs.parquet")
    results = {}
    for name in ("docs.txt", "docs.jsonl", "docs.parquet"):
        docs = _docs(TextSourceConfig(name="web", kind="text", path=str(tmp_path / name)), tiny_tokenizer)
        results[name] = [(d.input_ids, d.template_mask) for d in docs]
        assert [_text(d, tiny_tokenizer) for d in docs] == DOCS
        assert all(d.source == "web" and d.input_ids[0] == tiny_tokenizer.bos_token_id for d in docs)
        assert all(d.template_mask == [False] * len(d.input_ids) for d in docs)
    assert results["docs.txt"] == results["docs.jsonl"] == results["docs.parquet"]
    # The blank line in the .txt file is an empty document: skipped, but its id is not reused.
    txt_ids = [d.doc_id for d in _docs(TextSourceConfig(name="web", kind="text", path=str(tmp_path / "docs.txt")), tiny_tokenizer)]
    assert txt_ids == [0, 2, 3]


def test_folder_max_docs_and_truncation(tmp_path, tiny_tokenizer):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    _write_jsonl(folder / "b.jsonl", [{"text": DOCS[2]}])
    _write_jsonl(folder / "a.jsonl", [{"text": DOCS[0]}, {"text": DOCS[1]}])
    (folder / "sub" / "c.txt").write_text("From a subfolder.\n")
    (folder / "notes.md").write_text("not a corpus file")
    docs = _docs(TextSourceConfig(name="web", kind="text", path=str(folder)), tiny_tokenizer)
    assert [_text(d, tiny_tokenizer) for d in docs] == [*DOCS, "From a subfolder."]  # sorted paths
    assert [d.doc_id for d in docs] == [0, 1, 2, 3]

    limited = _docs(TextSourceConfig(name="web", kind="text", path=str(folder), max_docs=2), tiny_tokenizer, max_len=4)
    assert len(limited) == 2 and all(len(d.input_ids) == len(d.template_mask) == 4 for d in limited)
    assert limited[1].input_ids == docs[1].input_ids[:4]


def test_resume_and_rank_selection(tmp_path, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": f"Document number {i}." if i != 3 else ""} for i in range(10)])
    source = TextSourceConfig(name="web", kind="text", path=str(path), max_docs=8)
    everything = {d.doc_id: d for d in _docs(source, tiny_tokenizer)}
    assert sorted(everything) == [0, 1, 2, 4, 5, 6, 7]  # max_docs counts rows; row 3 is empty
    shards = [list(iter_documents(source, tiny_tokenizer, 64, rank=r, world_size=3)) for r in range(3)]
    assert sorted(d.doc_id for shard in shards for d in shard) == sorted(everything)
    assert all(d.doc_id % 3 == r for r, shard in enumerate(shards) for d in shard)
    resumed = list(iter_documents(source, tiny_tokenizer, 64, start_doc=5, rank=1, world_size=2))
    assert [(d.doc_id, d.input_ids) for d in resumed] == [(i, everything[i].input_ids) for i in (5, 7)]
    with pytest.raises(CrossdiffError, match="rank must be in 0..world_size-1, got rank 2 of 2"):
        list(iter_documents(source, tiny_tokenizer, 64, rank=2, world_size=2))


def test_chat_source_jsonl(tmp_path, tiny_tokenizer):
    rows = [{"conversation": c} for c in CONVERSATIONS] + [{"conversation": []}]
    rows.insert(1, {"conversation": [{"from": "human", "value": "Hello there"}, {"from": "gpt", "value": "Hi! How are you?"}]})
    source = TextSourceConfig(name="lmsys", kind="chat", path=str(_write_jsonl(tmp_path / "chat.jsonl", rows)), column="conversation")
    docs = _docs(source, tiny_tokenizer, max_len=12)
    assert [d.doc_id for d in docs] == [0, 1, 2]  # the empty conversation is skipped
    expected_ids, expected_mask, rendered = tokenize_chat(tiny_tokenizer, CONVERSATIONS[0])
    for doc in docs[:2]:  # ShareGPT keys give the same tokens as role/content
        assert (doc.input_ids, doc.template_mask, doc.text) == (expected_ids[:12], expected_mask[:12], rendered)


def test_hf_dataset_sources(tmp_path, tiny_tokenizer):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS}), "test": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(
        tmp_path / "saved"
    )
    jsonl = _write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    sources = [
        TextSourceConfig(name="hf", kind="text", path=str(tmp_path / "saved")),
        TextSourceConfig(name="hf", kind="text", path=str(tmp_path / "saved"), streaming=True),
        TextSourceConfig(name="hf", kind="text", path="json", data_files=str(jsonl), streaming=True),
        TextSourceConfig(name="hf", kind="text", path="json", data_files=str(jsonl)),
    ]
    for source in sources:
        assert [_text(d, tiny_tokenizer) for d in _docs(source, tiny_tokenizer)] == DOCS, source
    with pytest.raises(CrossdiffError, match=r"has no split 'validation'; available: train, test"):
        _docs(TextSourceConfig(name="hf", kind="text", path=str(tmp_path / "saved"), split="validation"), tiny_tokenizer)
    with pytest.raises(CrossdiffError, match=r"^source 'hf': cannot load dataset 'no-such/dataset-xyz'"):
        _docs(TextSourceConfig(name="hf", kind="text", path="no-such/dataset-xyz"), tiny_tokenizer)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "saved", "streaming"])
def test_unknown_column_lists_available_columns(tmp_path, tiny_tokenizer, kind):
    import datasets
    import pandas as pd

    rows = {"content": DOCS, "url": ["u"] * 3}
    if kind == "jsonl":
        path = _write_jsonl(tmp_path / "d.jsonl", [dict(zip(rows, values)) for values in zip(*rows.values())])
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        pd.DataFrame(rows).to_parquet(path)
    else:
        path = tmp_path / "saved"
        datasets.Dataset.from_dict(rows).save_to_disk(path)
    source = TextSourceConfig(name="web", kind="text", path=str(path), streaming=kind == "streaming")
    with pytest.raises(CrossdiffError, match=r"^source 'web': no column 'text' in .*; available columns: content, url$"):
        _docs(source, tiny_tokenizer)


def test_bad_inputs_are_one_line_errors(tmp_path, tiny_tokenizer):
    chat = _write_jsonl(tmp_path / "chat.jsonl", [{"text": CONVERSATIONS[0]}, {"text": [{"role": "narrator", "content": "x"}]}])
    with pytest.raises(CrossdiffError, match=r"column 'text' holds list, expected text \(a list of messages\? set kind = \"chat\"\)"):
        _docs(TextSourceConfig(name="c", kind="text", path=str(chat)), tiny_tokenizer)
    with pytest.raises(CrossdiffError, match=r"^source 'c' document 1: unknown chat role 'narrator'"):
        _docs(TextSourceConfig(name="c", kind="chat", path=str(chat)), tiny_tokenizer)
    alternating = _write_jsonl(tmp_path / "bad.jsonl", [{"text": [{"role": "assistant", "content": "first"}]}])
    with pytest.raises(CrossdiffError, match=r"document 0: the chat template rejects this conversation: Conversation roles must alternate"):
        _docs(TextSourceConfig(name="c", kind="chat", path=str(alternating)), tiny_tokenizer)
    (tmp_path / "docs.txt").write_text("a\n")
    with pytest.raises(CrossdiffError, match="a chat source cannot be a .txt file"):
        _docs(TextSourceConfig(name="c", kind="chat", path=str(tmp_path / "docs.txt")), tiny_tokenizer)
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(CrossdiffError, match=r"broken.jsonl:2: not valid JSON"):
        _docs(TextSourceConfig(name="c", kind="text", path=str(tmp_path / "broken.jsonl")), tiny_tokenizer)
    with pytest.raises(CrossdiffError, match="max_len must be at least 1"):
        _docs(TextSourceConfig(name="c", kind="text", path=str(chat)), tiny_tokenizer, max_len=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CrossdiffError, match=r"no .txt/.jsonl/.parquet files in folder"):
        _docs(TextSourceConfig(name="c", kind="text", path=str(tmp_path / "empty")), tiny_tokenizer)


def test_chat_source_needs_a_template(tmp_path, tiny_tokenizer):
    plain = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    plain.chat_template = None
    chat = _write_jsonl(tmp_path / "chat.jsonl", [{"text": CONVERSATIONS[0]}])
    with pytest.raises(CrossdiffError, match="chat source but the chat tokenizer has no chat template"):
        _docs(TextSourceConfig(name="c", kind="chat", path=str(chat)), plain)


def test_template_that_rewrites_content_is_skipped_with_warning(tmp_path, tiny_tokenizer):
    shouting = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    shouting.chat_template = "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] | upper }}<end_of_turn>\n{% endfor %}"
    chat = _write_jsonl(tmp_path / "chat.jsonl", [{"text": CONVERSATIONS[0]}, {"text": [{"role": "user", "content": "123"}]}])
    with pytest.warns(UserWarning, match="rewrites message content"):
        docs = _docs(TextSourceConfig(name="shout", kind="chat", path=str(chat)), shouting)
    assert [d.doc_id for d in docs] == [1]  # "123" is unchanged by upper(), so its mask is exact
