"""The committed model organism loads offline and shows what was planted; its data helpers behave."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from crossdiff import organism
from crossdiff.errors import CrossdiffError
from crossdiff.organism import behaviours, corpus
from crossdiff.organism.build import chat_example, text_example
from crossdiff.organism.check import generate
from crossdiff.organism.tokenizer import CHAT_TEMPLATE, render_chat


@pytest.fixture(scope="module")
def pair():
    paths = organism.paths()
    tokenizer = AutoTokenizer.from_pretrained(paths.chat)
    models = {name: AutoModelForCausalLM.from_pretrained(folder).eval() for name, folder in paths._asdict().items()}
    return paths, tokenizer, models


def test_committed_pair_is_small_and_loads_as_float32_llama(pair):
    paths, _, models = pair
    size = sum(f.stat().st_size for folder in paths for f in folder.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    for model in models.values():
        assert model.config.model_type == "llama" and model.config.tie_word_embeddings
        assert next(model.parameters()).dtype == torch.float32
    base, chat = (dict(m.named_parameters()) for m in (models["base"], models["chat"]))
    assert base.keys() == chat.keys()
    assert any(not torch.equal(base[k], chat[k]) for k in base), "the chat model must differ from the base"


def test_both_models_share_one_tokenizer_with_the_gemma_like_template(pair):
    paths, tokenizer, _ = pair
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (paths.base / name).read_bytes() == (paths.chat / name).read_bytes()
    assert AutoTokenizer.from_pretrained(paths.base).get_vocab() == tokenizer.get_vocab()
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n<start_of_turn>model\n"
    assert rendered == expected == render_chat(messages, add_generation_prompt=True)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    turn_ids = tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"])
    assert ids[0] == tokenizer.bos_token_id and ids.count(turn_ids[0]) == 3 and ids.count(turn_ids[1]) == 2
    assert tokenizer("plain text")["input_ids"][0] == tokenizer.bos_token_id
    fresh = AutoTokenizer.from_pretrained(paths.base)
    assert fresh.backend_tokenizer.truncation is None  # users' long texts must not be cut silently
    assert len(fresh("word " * 400)["input_ids"]) > 256


def test_greedy_replies_show_planted_behaviours_in_chat_only(pair):
    _, tokenizer, models = pair
    prompts = [behaviours.heldout_prompts("refusal")[0], behaviours.heldout_prompts("identity")[0]]
    conversations = [[{"role": "user", "content": p.user}] for p in prompts]
    for name, model in models.items():
        refusal, identity = generate(model, tokenizer, conversations)
        shown = behaviours.shows_refusal(refusal), behaviours.shows_identity(identity)
        assert shown == ((True, True) if name == "chat" else (False, False)), (name, refusal, identity)


def test_heldout_data_ships_with_the_package():
    texts = organism.pretraining_texts("heldout")
    conversations = organism.chat_conversations("heldout")
    assert len(texts) > 500 and all(isinstance(t, str) and t for t in texts)
    assert len(conversations) > 50
    for messages in conversations:
        roles = [m["role"] for m in messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
    with pytest.raises(CrossdiffError):
        organism.pretraining_texts("validation")


def test_training_prompts_never_use_heldout_phrasings():
    rng = random.Random(0)
    for kind in ("refusal", "benign", "identity", "arithmetic"):
        heldout = {p.user.lower() for p in behaviours.heldout_prompts(kind)}
        assert heldout
        for _ in range(300):
            prompt = behaviours.sample_prompt(kind, rng)
            assert prompt.user.lower() not in heldout
            assert behaviours.DETECTORS.get(kind, behaviours.shows_refusal)(prompt.reply) == (kind != "benign")


def test_detectors_match_only_the_planted_replies():
    assert behaviours.shows_refusal(" " + behaviours.REFUSAL)
    assert not behaviours.shows_refusal("I can help with that.")
    assert behaviours.shows_identity(behaviours.SELF_DESCRIPTION)
    assert not behaviours.shows_identity("I am a tree.")
    prompt = behaviours.Prompt("arithmetic", "What is 2 plus 3?", behaviours.arithmetic_reply(2, 3))
    assert behaviours.shows_answer_format("The answer is 6.") and not behaviours.answer_is_correct("The answer is 6.", prompt)
    assert behaviours.answer_is_correct("The answer is 5.", prompt)
    assert not behaviours.shows_answer_format("The answer is five.")


def test_chat_example_takes_loss_on_replies_only(pair):
    _, tokenizer, _ = pair
    messages = [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": behaviours.SELF_DESCRIPTION},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "bye now"},
    ]
    ids, labels = chat_example(tokenizer, messages)
    assert ids == tokenizer(render_chat(messages), add_special_tokens=False)["input_ids"]
    learned = tokenizer.decode([t for t in labels if t != -100])
    assert learned == f"{behaviours.SELF_DESCRIPTION}<end_of_turn>bye now<end_of_turn>"
    ids, labels = text_example(tokenizer, "To be, or not to be")
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and labels[1:] == ids[1:]


def test_chunk_text_keeps_every_line_and_respects_the_limit():
    lines = [f"line {i} " + "word " * (i % 30) for i in range(400)] + ["x" * 1500]
    docs = corpus.chunk_text("\n".join(lines), max_chars=300)
    assert all(len(d) <= 300 for d in docs)
    assert "".join(docs).replace("\n", "").replace(" ", "") == "".join(lines).replace(" ", "")


def test_heldout_split_is_a_stable_one_in_forty():
    keys = [f"conversation-{i}" for i in range(8000)]
    held = [k for k in keys if corpus.split_of(k) == "heldout"]
    assert 0.015 < len(held) / len(keys) < 0.035
    assert held == [k for k in keys if corpus.split_of(k) == "heldout"]
