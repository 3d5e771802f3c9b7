"""The chat model's own answers as a collection source (kind = "answers") on tiny models:
answered greedily and read by both models as chat, resumable after kill -9, capped to the
models' context, one line for a prompt file with no usable prompt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crossdiff.cache.store import PairedCache
from crossdiff.cli import main
from crossdiff.collect.collector import CollectConfig, collect
from crossdiff.config import from_dict, to_dict
from crossdiff.errors import CrossdiffError

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the quick brown fox jumps over lazy dog model chat user answer question paris rome sea wind poem".split()


def make_config(pair, prompts: Path, out: Path, **source) -> CollectConfig:
    return from_dict(CollectConfig, {
        "base": str(pair[0]), "chat": str(pair[1]), "layer": 1, "out": str(out),
        "sources": [{"name": "own", "kind": "answers", "path": str(prompts), "column": "prompt", "max_new_tokens": 12, **source}],
        "max_len": 64, "batch_size": 2, "shard_tokens": 2000, "model_dtype": "float32", "device": "cpu", "dtype": "float32",
    })


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def answers(folder: Path) -> list[dict]:
    return [json.loads(line) for part in sorted(folder.glob("part-*.jsonl")) for line in part.read_text().splitlines()]


def test_answers_are_the_chat_models_greedy_replies_read_by_both_models(tmp_path, tiny_pair_paths):
    from crossdiff.causal.conversations import answer_prompts
    from crossdiff.models import load_model_pair

    prompts = write_prompts(tmp_path / "p.jsonl", ["hello there", "   ", "what is the capital of France?", "write a poem"])
    summary = collect(make_config(tiny_pair_paths, prompts, tmp_path / "c"), quiet=True)
    folder = tmp_path / "c" / "answers" / "own"
    rows = answers(folder)
    assert [r["prompt_row"] for r in rows] == [0, 2, 3]  # the blank prompt is not answered
    assert json.loads((folder / "complete.json").read_text()) == {"answered": 3, "rows": 4, "unusable": 1}
    pair = load_model_pair(*map(str, tiny_pair_paths), dtype="float32")
    expected = answer_prompts(pair.chat, pair.tokenizer, ["hello there", "what is the capital of France?", "write a poem"],
                              max_new_tokens=12, batch_size=2)
    assert [r["messages"] for r in rows] == expected
    cache = PairedCache(summary.path)
    assert cache.sources == ["own"] and cache.n_tokens == summary.tokens_per_source["own"] > 0
    assert sorted(set(cache.tokens(0)["doc_id"].tolist())) == [0, 1, 2]
    chat_only = from_dict(CollectConfig, {**to_dict(make_config(tiny_pair_paths, prompts, tmp_path / "x")),
                                          "sources": [{"name": "c", "kind": "chat", "path": "x.jsonl"}]})
    assert set(chat_only.identity()["sources"][0]) == {"name", "kind", "path", "split", "column", "streaming", "max_docs",
                                                        "hf_config", "data_files"}  # caches from before answers resume


def test_killed_answering_resumes_to_the_same_answers(tmp_path, tiny_pair_paths):
    prompts = write_prompts(tmp_path / "p.jsonl", [" ".join(WORDS[i % 7: i % 7 + 3 + i % 5]) for i in range(120)])
    config = make_config(tiny_pair_paths, prompts, tmp_path / "killed", max_new_tokens=40)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"collect": to_dict(config)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "crossdiff.cli", "collect", "--config", str(recipe), "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    folder = tmp_path / "killed" / "answers" / "own"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(folder.glob("part-*.jsonl"))) >= 3:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (folder / "complete.json").exists(), "answered everything before the kill; the test wants a partial folder"
    before = answers(folder)
    assert 0 < len(before) < 120

    collect(config, quiet=True)  # the same command again: keeps the parts, answers the rest
    straight = make_config(tiny_pair_paths, prompts, tmp_path / "straight", max_new_tokens=40)
    collect(straight, quiet=True)
    resumed = answers(folder)
    assert resumed[:len(before)] == before and len(resumed) == 120
    assert resumed == answers(tmp_path / "straight" / "answers" / "own")
    assert not list(folder.glob("*.tmp"))
    assert PairedCache(tmp_path / "killed").n_tokens == PairedCache(tmp_path / "straight").n_tokens


def test_prompt_and_answer_fit_the_models_context(tmp_path, tiny_pair_paths, monkeypatch):
    from transformers import GenerationMixin

    lengths = []  # prompt plus answer (and left padding) of every generate call, in tokens
    original = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        lengths.append(out.shape[1])
        return out

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    long_prompt = " ".join(["the quick brown fox"] * 20)   # ~90 tokens of the 256 the tiny models hold
    too_long = " ".join(["the quick brown fox"] * 80)     # more than 256
    prompts = write_prompts(tmp_path / "p.jsonl", [long_prompt, too_long, "hi"])
    collect(make_config(tiny_pair_paths, prompts, tmp_path / "c", max_new_tokens=1000), quiet=True)
    rows = answers(tmp_path / "c" / "answers" / "own")
    assert [r["prompt_row"] for r in rows] == [0, 2]  # the prompt longer than the context is not answered
    assert json.loads((tmp_path / "c" / "answers" / "own" / "complete.json").read_text())["unusable"] == 1
    assert lengths == [256]  # one batch, stopped at the context (random tiny models never end their turn)


@pytest.mark.parametrize("content", ["\n\n  \n", '{"prompt": ""}\n{"prompt": "   "}\n'])
def test_no_usable_prompt_is_one_line(tmp_path, tiny_pair_paths, content, capsys):
    prompts = tmp_path / ("p.txt" if content.startswith("\n") else "p.jsonl")
    prompts.write_text(content)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"collect": to_dict(make_config(tiny_pair_paths, prompts, tmp_path / "c"))}))
    assert main(["collect", "--config", str(recipe), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("crossdiff: error:"), err
    assert "source 'own': no usable prompt in" in err


def test_changed_answer_settings_are_refused_in_one_line(tmp_path, tiny_pair_paths):
    prompts = write_prompts(tmp_path / "p.jsonl", ["hello there"])
    shared = tmp_path / "answers"
    collect(make_config(tiny_pair_paths, prompts, tmp_path / "a", answers=str(shared)), quiet=True)
    with pytest.raises(CrossdiffError, match=r"holds answers made with other settings \(max_new_tokens: 12 there, 5 now\)"):
        collect(make_config(tiny_pair_paths, prompts, tmp_path / "b", answers=str(shared), max_new_tokens=5), quiet=True)
