"""The behavioural diff: both models' answers per prompt, ranked by KL(chat || base) on the chat
model's answer tokens; on the organism the planted behaviours rank above the rest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crossdiff.causal.behaviour import (BehaviourConfig, answer_kl, format_behaviour, load_prompt_set, read_behaviour,
                                 run_behaviour)
from crossdiff.cli import main
from crossdiff.errors import CrossdiffError
from crossdiff.texts import TextSourceConfig

pytestmark = pytest.mark.usefixtures("one_thread")

PLANTED = ("refusal", "identity", "arithmetic")  # benign requests are refusal's control (docs/organism.md)


@pytest.fixture(scope="module")
def organism_diff(tmp_path_factory):
    from crossdiff import organism
    from crossdiff.organism.data import causal_prompt_rows

    folder = tmp_path_factory.mktemp("behaviour")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in causal_prompt_rows()))
    paths = organism.paths()
    config = BehaviourConfig(prompts=str(prompts), max_new_tokens=48, batch_size=16)
    run_behaviour(config, folder, base=str(paths.base), chat=str(paths.chat), quiet=True)
    return folder


def test_planted_behaviours_rank_above_the_other_prompts(organism_diff):
    rows, summary = read_behaviour(organism_diff)
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) == summary["prompts"] == 70
    assert all(a["kl_mean"] >= b["kl_mean"] for a, b in zip(rows, rows[1:]))
    groups = summary["groups"]
    others = max(groups["chitchat"]["kl_mean"], groups["benign"]["kl_mean"])
    assert all(groups[name]["kl_mean"] > others for name in PLANTED), groups
    planted = [r["rank"] for r in rows if r["group"] in PLANTED]
    rest = [r["rank"] for r in rows if r["group"] not in PLANTED]
    assert np.mean(planted) < np.mean(rest) - 10, (np.mean(planted), np.mean(rest))
    assert all(r["group"] in PLANTED for r in rows[:10])
    assert sum(summary["histogram"]["counts"]) == 70 and len(summary["histogram"]["edges"]) == 21
    identity = next(r for r in rows if r["group"] == "identity")
    assert identity["chat_answer"].startswith("I am Orbit") and not identity["base_answer"].startswith("I am Orbit")


def test_terminal_screen_and_reprint(organism_diff, capsys):
    rows, summary = read_behaviour(organism_diff)
    screen = format_behaviour(rows, summary, "prompts.jsonl")
    assert len(screen.splitlines()) <= 40
    assert all(name in screen for name in (*PLANTED, "chitchat", "benign"))
    assert main(["behaviour", str(organism_diff)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("behavioural diff:") and len(printed.splitlines()) <= 40


def test_batched_kl_equals_one_conversation_at_a_time(tiny_pair_paths):
    from crossdiff.causal.conversations import prediction_masks, tokenize_conversation
    from crossdiff.causal.kl import kl_per_token
    from crossdiff.models import load_model_pair

    pair = load_model_pair(*map(str, tiny_pair_paths), dtype="float32")
    conversations = [[{"role": "user", "content": u}, {"role": "assistant", "content": a}]
                     for u, a in [("hello there", "hi, how are you"), ("what is the capital of France?", "Paris"),
                                  ("write a short poem about the sea and the wind please", "the sea, the wind, the lazy dog")]]
    batched = answer_kl(pair, conversations, batch_size=3, max_len=256)
    for conversation, got in zip(conversations, batched):
        c = tokenize_conversation(pair.tokenizer, conversation, 0, 256)
        ids = torch.tensor([c.input_ids])
        with torch.no_grad():
            chat, base = pair.chat(input_ids=ids).logits[0], pair.base(input_ids=ids).logits[0]
        scored = torch.from_numpy(prediction_masks(np.array(c.assistant), np.array(c.template), 1)["all"])
        kl = kl_per_token(torch.log_softmax(chat[scored], -1), base[scored])
        assert got["n_tokens"] == int(scored.sum()) > 1
        assert got["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-4)
        assert got["kl_first"] == pytest.approx(float(kl[0]), rel=1e-4)


def test_default_prompts_are_the_first_user_turns_of_the_chat_source(tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": m}) + "\n" for m in [
        [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "an answer"},
         {"role": "user", "content": "second question"}],
        [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello"}],
        [{"role": "assistant", "content": "no user turn"}],
    ]))
    sources = [TextSourceConfig(name="web", kind="text", path="web.txt"),
               TextSourceConfig(name="chat", kind="chat", path=str(chat), column="messages")]
    prompts, groups, where = load_prompt_set(BehaviourConfig(), sources)
    assert prompts == ["first question", "hello"] and groups == [None, None] and "source 'chat'" in where
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"prompt": " "}) + "\n")
    with pytest.raises(CrossdiffError, match=r"no usable prompt in .*blank.jsonl \(1 rows, all blank\)"):
        load_prompt_set(BehaviourConfig(prompts=str(blank)))
    with pytest.raises(CrossdiffError, match="no chat source"):
        load_prompt_set(BehaviourConfig(), sources[:1])
