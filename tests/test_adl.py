"""The activation-difference baseline (crossdiff.analysis.adl) on tiny model pairs."""

import json

import pytest
import torch

from crossdiff.analysis.adl import ADLConfig, logit_lens, mean_differences, run_adl
from crossdiff.errors import CrossdiffError
from crossdiff.models import load_model_pair, residual_after_block


@pytest.fixture(scope="module")
def llama_pair(tiny_model_pairs):
    base, chat = tiny_model_pairs["llama"]
    return load_model_pair(base, chat, dtype="float32")


def test_mean_differences_by_hand(llama_pair, one_thread):
    docs = [[1, 5, 9, 12, 40], [1, 7, 7, 30], [1, 3]]  # the last is shorter than k = 4 and is left out
    deltas, mean_norm = mean_differences(llama_pair, 1, docs, 4, batch_size=1)
    expected, norms = torch.zeros(4, deltas.shape[1], dtype=torch.float64), []
    for doc in docs[:2]:
        ids = torch.tensor([doc[:4]])
        base = residual_after_block(llama_pair.base, 1, ids, torch.ones_like(ids))[0].double()
        chat = residual_after_block(llama_pair.chat, 1, ids, torch.ones_like(ids))[0].double()
        expected += (chat - base) / 2
        norms += chat[1:].norm(dim=-1).tolist()
    torch.testing.assert_close(deltas, expected, rtol=1e-6, atol=1e-7)
    assert mean_norm == pytest.approx(sum(norms) / len(norms))
    assert deltas.abs().max() > 0  # the tiny chat model differs from its base
    with pytest.raises(CrossdiffError) as excinfo:
        mean_differences(llama_pair, 1, [[1, 2]], 4)
    assert "no document has 4 tokens" in str(excinfo.value)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logit_lens_of_the_last_block_is_the_models_prediction(tiny_model_pairs, arch, tiny_tokenizer):
    pair = load_model_pair(*tiny_model_pairs[arch], dtype="float32")
    ids = torch.tensor([[1, 5, 9, 12]])
    last = pair.chat.config.num_hidden_layers - 1 if hasattr(pair.chat.config, "num_hidden_layers") else pair.chat.config.n_layer - 1
    h = residual_after_block(pair.chat, last, ids, torch.ones_like(ids))[0, -1]
    logits = pair.chat(input_ids=ids).logits[0, -1]
    expected = [pair.tokenizer.decode([int(i)]) for i in logits.topk(5).indices]
    assert logit_lens(pair.chat, pair.tokenizer, h, 5) == expected


def test_run_adl_writes_lens_and_steering_rows(tmp_path, llama_pair, one_thread):
    texts = tmp_path / "texts.txt"
    texts.write_text("the quick brown fox jumps over the lazy dog\n" * 3 + "a b c d e f g\n")
    config = ADLConfig(base="-", chat="-", layer=1, texts=str(texts), out=str(tmp_path / "adl"), positions=3, top_tokens=4,
                       prompts=["Hi there"], factors=[1.0, 2.0], expect="the", controls=1, max_new_tokens=3)
    summary = run_adl(config, pair=llama_pair, quiet=True)
    assert [row["position"] for row in summary["by_position"]] == [0, 1, 2]
    assert all(len(row["lens_base"]) == 4 and len(row["lens_chat"]) == 4 for row in summary["by_position"])
    assert torch.load(tmp_path / "adl" / "differences.pt").shape == (3, llama_pair.chat.config.hidden_size)
    rows = [json.loads(line) for line in (tmp_path / "adl" / "adl_steering.jsonl").read_text().splitlines()]
    # 2 models x (positions 1, 2 + 1 random control) x 1 prompt x 2 factors
    assert len(rows) == 12 and sum(r["control"] for r in rows) == 4
    assert {r["latent"] for r in rows} >= {"base: pos 1", "chat: pos 2", "chat: random 0"}
    assert all(isinstance(r["matches"], bool) for r in rows)
    assert json.loads((tmp_path / "adl" / "adl.json").read_text())["documents"] == 4

    # `crossdiff score` grades the output as a method: its positions, and its base steering by each behaviour's expect
    from crossdiff.organism.score import score_run

    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps({"behaviours": [{"name": "fox", "patterns": ["fox"], "prompts": ["Hi there"], "expect": "the"}]}))
    graded = score_run(tmp_path, truth)["methods"]["adl"]
    assert graded["kind"] == "adl" and [r["latent"] for r in graded["findings"]] == ["pos 0", "pos 1", "pos 2"]
    best = graded["steering_success"]["fox"]
    base = [r for r in rows if r["model"] == "base"]
    shown = {f"{r['latent'][6:]} x{r['factor']:g}": r["matches"] for r in base}  # one prompt: a count of 0 or 1
    assert best["prompts"] == 1 and best["steered"] == shown[f"{best['by']} x{best['factor']}"]
    assert best["steered"] == max(v for k, v in shown.items() if not k.startswith("random"))


def test_adl_bad_options_are_one_line():
    with pytest.raises(CrossdiffError) as excinfo:
        ADLConfig(base="a", chat="b", layer=1, texts="t", out="o", positions=3, steer_positions=[3])
    assert "--steer-position must be in 0..2" in str(excinfo.value)
    with pytest.raises(CrossdiffError):
        ADLConfig(base="a", chat="b", layer=1, texts="t", out="o", expect="(")
