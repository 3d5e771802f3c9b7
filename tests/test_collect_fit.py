"""Collection that fits the model: max_len capped at the model's positions, BOS for plain
text, a failed empty first run that does not block the corrected one, and settings-mismatch
messages that name only what differs."""

from __future__ import annotations

import copy
import json

import pytest

from crossdiff.cache.store import PairedCache
from crossdiff.collect.collector import CollectConfig, collect
from crossdiff.config import from_dict
from crossdiff.errors import CrossdiffError
from crossdiff.texts import TextSourceConfig, iter_documents

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def texts(tmp_path):
    web = tmp_path / "web.jsonl"
    web.write_text("".join(json.dumps({"text": " ".join(["the quick brown fox"] * n)}) + "\n" for n in (5, 150, 8)))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "hello there"},
                                                      {"role": "assistant", "content": "hi, how are you"}]}) + "\n"
                            for _ in range(4)))
    return web, chat


def config(pair, web, chat, out, **overrides) -> CollectConfig:
    data = {"base": str(pair[0]), "chat": str(pair[1]), "layer": 1, "out": str(out),
            "sources": [{"name": "web", "kind": "text", "path": str(web)},
                        {"name": "chat", "kind": "chat", "path": str(chat), "column": "messages"}],
            "max_len": 64, "batch_size": 2, "shard_tokens": 2000, "model_dtype": "float32", "device": "cpu",
            "dtype": "float32"}
    return from_dict(CollectConfig, {**data, **overrides})


def test_max_len_is_capped_at_the_models_positions(tmp_path, tiny_pair_paths, texts):
    with pytest.warns(UserWarning, match=r"max_len 400 exceeds the models' max_position_embeddings \(256\)"):
        collect(config(tiny_pair_paths, *texts, tmp_path / "c", max_len=400), quiet=True)
    tokens = PairedCache(tmp_path / "c").tokens(0)
    assert tokens["position"].max() == 255  # the 600-token document was cut at 256


def test_plain_text_gets_the_bos_the_tokenizer_does_not_add(tiny_tokenizer, texts):
    from tokenizers import processors

    tok = copy.deepcopy(tiny_tokenizer)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    assert tok("hello")["input_ids"][0] != tok.bos_token_id  # has a BOS token, does not add it
    source = TextSourceConfig(name="web", kind="text", path=str(texts[0]))
    first = [doc.input_ids[0] for doc in iter_documents(source, tok, 32)]
    assert first == [tok.bos_token_id] * 3
    never = [doc.input_ids[0] for doc in iter_documents(source, tiny_tokenizer, 32, bos="never")]
    assert tiny_tokenizer.bos_token_id not in never
    chat = TextSourceConfig(name="chat", kind="chat", path=str(texts[1]), column="messages")
    assert all(doc.input_ids[0] == tok.bos_token_id for doc in iter_documents(chat, tok, 32, bos="always"))


def test_a_failed_empty_first_collect_does_not_block_the_corrected_rerun(tmp_path, tiny_pair_paths, texts):
    wrong_first = config(tiny_pair_paths, *texts, tmp_path / "d")
    wrong_first.sources[0].column = "body"
    with pytest.raises(CrossdiffError, match="no column 'body'"):
        collect(wrong_first, quiet=True)
    summary = collect(config(tiny_pair_paths, *texts, tmp_path / "d"), quiet=True)  # nothing stored: starts afresh
    assert summary.tokens_per_source["chat"] > 0


def test_settings_mismatch_names_only_the_differing_keys(tmp_path, tiny_pair_paths, texts):
    collect(config(tiny_pair_paths, *texts, tmp_path / "c", max_tokens=40), quiet=True)
    changed = config(tiny_pair_paths, *texts, tmp_path / "c", max_tokens=40)
    changed.sources[1].split = "test"
    with pytest.raises(CrossdiffError) as err:
        collect(changed, quiet=True)
    message = str(err.value)
    assert "config differs in sources[1].split: 'train' there, 'test' now)" in message
    assert "hf_config" not in message and "column" not in message


def test_holdout_splits_documents_into_disjoint_parts(tmp_path, tiny_tokenizer):
    from crossdiff.texts import is_heldout

    lines = tmp_path / "docs.txt"
    lines.write_text("".join(f"document number {i}\n" for i in range(400)))
    source = TextSourceConfig(name="web", kind="text", path=str(lines))
    train = {doc.doc_id for doc in iter_documents(source, tiny_tokenizer, 16, holdout=0.2)}
    heldout = {doc.doc_id for doc in iter_documents(source, tiny_tokenizer, 16, holdout=0.2, part="heldout")}
    assert not train & heldout and train | heldout == set(range(400))
    assert 0.15 < len(heldout) / 400 < 0.25
    assert heldout == {i for i in range(400) if is_heldout(i, 0.2)}
    # Resuming mid-source keeps the split.
    assert {doc.doc_id for doc in iter_documents(source, tiny_tokenizer, 16, holdout=0.2, start_doc=200)} == \
        {i for i in train if i >= 200}
