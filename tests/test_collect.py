"""`crossdiff collect` end to end on tiny models: correctness, budgets, crash/resume, ranks, bad input."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from crossdiff.cache import store as cache_mod
from crossdiff.cache.store import PairedCache
from crossdiff.cli import main
from crossdiff.collect.collector import CollectConfig, collect
from crossdiff.config import from_dict
from crossdiff.errors import CrossdiffError
from crossdiff.texts import iter_documents

WORDS = "the quick brown fox jumps over lazy dog model chat user answer question paris rome sea wind poem".split()
LAYER = 1


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("texts")
    rng = random.Random(0)
    (root / "web.txt").write_text(
        "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) + "\n" for _ in range(60))
    )
    with open(root / "chat.jsonl", "w") as f:
        for _ in range(30):
            turns = [
                {"role": role, "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))}
                for role in ("user", "assistant")
            ]
            f.write(json.dumps({"messages": turns}) + "\n")
    return {"web": root / "web.txt", "chat": root / "chat.jsonl"}


def make_config(pair, texts, out, **overrides) -> CollectConfig:
    data = {
        "base": str(pair[0]), "chat": str(pair[1]), "layer": LAYER, "out": str(out),
        "sources": [
            {"name": "web", "kind": "text", "path": str(texts["web"])},
            {"name": "chat", "kind": "chat", "path": str(texts["chat"]), "column": "messages"},
        ],
        "max_len": 24, "batch_size": 3, "shard_tokens": 100, "model_dtype": "float32", "device": "cpu",
    }
    return from_dict(CollectConfig, {**data, **overrides})


pytestmark = pytest.mark.usefixtures("one_thread")


def test_cached_activations_are_the_models_hidden_states(tmp_path, tiny_pair_paths, tiny_tokenizer, texts):
    from transformers import AutoModelForCausalLM

    config = make_config(tiny_pair_paths, texts, tmp_path / "c", dtype="float32", max_tokens={"web": 300})
    collect(config, quiet=True)
    cache = PairedCache(tmp_path / "c", verify=True)
    assert cache.sources == ["web", "chat"] and cache.layer == LAYER
    rows = {}
    for batch in cache.iter_batches(64):
        for i in range(len(batch.acts)):
            rows[int(batch.source_ids[i]), int(batch.doc_ids[i]), int(batch.positions[i])] = (
                batch.acts[i], int(batch.token_ids[i]), bool(batch.template[i])
            )
    assert cache.manifest["tokens_per_source"]["web"] == 300
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in tiny_pair_paths]
    checked = 0
    for source_id, source in enumerate(config.sources):
        for doc in iter_documents(source, tiny_tokenizer, config.max_len):
            if (source_id, doc.doc_id, 0) not in rows:
                continue
            ids = torch.tensor([doc.input_ids])
            with torch.no_grad():  # the naive reference: full forward, one document at a time
                hidden = [m(ids, output_hidden_states=True).hidden_states[LAYER + 1][0] for m in models]
            for pos in range(len(doc.input_ids)):
                if (source_id, doc.doc_id, pos) not in rows:  # the budget cut this document short
                    assert source.name == "web"
                    break
                acts, token, template = rows.pop((source_id, doc.doc_id, pos))
                torch.testing.assert_close(acts, torch.stack([hidden[0][pos], hidden[1][pos]]), atol=2e-5, rtol=1e-4)
                assert token == doc.input_ids[pos] and template == doc.template_mask[pos]
                checked += 1
    assert not rows and checked == cache.n_tokens
    # chat documents carry template tokens, plain text none
    assert cache.manifest["bos_token_id"] == tiny_tokenizer.bos_token_id


def test_budgets_shards_and_statistics(tmp_path, tiny_pair_paths, texts):
    config = make_config(tiny_pair_paths, texts, tmp_path / "c", max_tokens={"web": 250, "chat": 120})
    summary = collect(config, quiet=True)
    cache = PairedCache(tmp_path / "c")
    assert cache.manifest["tokens_per_source"] == {"web": 250, "chat": 120} == summary.tokens_per_source
    assert cache.dtype == "bfloat16" and cache.raw_acts(0).dtype == np.uint16
    for i, shard in enumerate(cache.shards):
        assert 0 < shard["n_tokens"] <= config.shard_tokens
        assert set(cache.tokens(i)["source_id"].tolist()) == {cache.sources.index(shard["source"])}
    acts = torch.cat([b.acts for b in cache.iter_batches(128)]).double()
    stats = cache.stats()
    for m, model in enumerate(("base", "chat")):
        np.testing.assert_allclose(stats[model]["mean"], acts[:, m].mean(0).numpy(), rtol=1e-9, atol=1e-12)
        assert stats[model]["mean_sq_norm"] == pytest.approx(acts[:, m].pow(2).sum(-1).mean().item(), rel=1e-9)
    template = torch.cat([b.template for b in cache.iter_batches(128)])
    source_ids = torch.cat([b.source_ids for b in cache.iter_batches(128)])
    assert template[source_ids == 1].any() and not template[source_ids == 0].any()
    # a second call finds the cache complete and loads no model
    again = collect(config, quiet=True)
    assert again.new_tokens == 0 and again.tokens_per_source == summary.tokens_per_source


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sigkill_mid_shard_then_rerun_gives_the_same_bytes(tmp_path, tiny_pair_paths, texts):
    config = make_config(tiny_pair_paths, texts, tmp_path / "killed", shard_tokens=60, batch_size=2)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"collect": {**_as_plain(config)}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "crossdiff.cli", "collect", "--config", str(recipe), "--quiet"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    out = tmp_path / "killed"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            sealed = _sealed_shards(out)
            partial = out / f"shard-{sealed:05d}" / "acts.npy"
            if sealed >= 2 and partial.exists() and partial.stat().st_size > 128:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    sealed = _sealed_shards(out)
    assert (out / f"shard-{sealed:05d}").exists(), "killed between shards; the test wants a partial shard"
    with pytest.raises(CrossdiffError, match="incomplete"):
        PairedCache(out)

    collect(config, quiet=True)  # the same command again: resumes
    collect(make_config(tiny_pair_paths, texts, tmp_path / "straight", shard_tokens=60, batch_size=2), quiet=True)
    killed, straight = _files(out), _files(tmp_path / "straight")
    assert killed.keys() == straight.keys()
    assert [name for name in killed if killed[name] != straight[name]] == []
    PairedCache(out, verify=True)


def _sealed_shards(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, ValueError):
        return 0


def _as_plain(config: CollectConfig) -> dict:
    from crossdiff.config import to_dict

    return to_dict(config)


def test_the_shared_path_resumes_from_any_saved_position_to_the_same_records(tmp_path, tiny_pair_paths, texts):
    """collect (positions before a batch, in its seals) and the stream (positions after one, in
    its checkpoints) resume through one rule: from any position the rest comes out unchanged."""
    from crossdiff.collect.paired import load_pair, paired_records
    from crossdiff.models import ResidualExtractor

    config = make_config(tiny_pair_paths, texts, tmp_path / "unused", max_tokens={"web": 200, "chat": 150})
    pair = load_pair(config, quiet=True)
    extractor = ResidualExtractor(pair, config.layer)
    steps = list(paired_records(pair, extractor, config, config.sources))
    assert [s.after.get("done", False) for s in steps].count(True) == 2 and steps[-1].after["done"]
    assert [sum(len(s.records.acts) for s in steps if s.records is not None and s.source == i) for i in (0, 1)] == [200, 150]

    def same(a, b):
        return len(a) == len(b) and all(
            (x.source, x.after) == (y.source, y.after) and (x.records is None) == (y.records is None)
            and (x.records is None or all(torch.equal(u, v) for u, v in zip(x.records, y.records)))
            for x, y in zip(a, b))

    end_of_web = next(i for i, s in enumerate(steps) if s.after.get("done"))
    for i in (0, 2, end_of_web - 1, end_of_web, len(steps) - 3):
        assert same(list(paired_records(pair, extractor, config, config.sources, position=steps[i].after)), steps[i + 1:]), i
        if steps[i + 1].records is not None:
            assert same(list(paired_records(pair, extractor, config, config.sources, position=steps[i + 1].before)), steps[i + 1:]), i
    chat_only = list(paired_records(pair, extractor, config, config.sources, order=[1]))
    assert same(chat_only, steps[end_of_web + 1:])


def test_ranks_collect_disjoint_documents_that_merge_into_one_cache(tmp_path, tiny_pair_paths, texts):
    single = tmp_path / "single"
    collect(make_config(tiny_pair_paths, texts, single, max_tokens=200, dtype="float32"), quiet=True)
    out = tmp_path / "ranks"
    summaries = [
        collect(make_config(tiny_pair_paths, texts, out, max_tokens=200, dtype="float32", rank=r, world_size=2), quiet=True)
        for r in (0, 1)
    ]
    assert [s.merged for s in summaries] == [False, True]
    merged = PairedCache(out, verify=True)
    assert merged.manifest["tokens_per_source"] == {"web": 200, "chat": 200}
    docs = {r: set(PairedCache(out / f"rank-{r}").tokens(0)["doc_id"].tolist()) for r in (0, 1)}
    assert all(d % 2 == 0 for d in docs[0]) and all(d % 2 == 1 for d in docs[1])
    # the same tokens hold the same activations as a single-process run (up to batching round-off)
    reference = {
        (int(s), int(d), int(p)): a for b in PairedCache(single).iter_batches(1000)
        for s, d, p, a in zip(b.source_ids, b.doc_ids, b.positions, b.acts)
    }
    for b in merged.iter_batches(1000):
        for s, d, p, a in zip(b.source_ids, b.doc_ids, b.positions, b.acts):
            if (int(s), int(d), int(p)) in reference:
                torch.testing.assert_close(a, reference[int(s), int(d), int(p)], atol=2e-5, rtol=1e-4)


def test_disk_full_is_one_line_and_leaves_the_last_good_manifest(tmp_path, tiny_pair_paths, texts, monkeypatch):
    config = make_config(tiny_pair_paths, texts, tmp_path / "c")
    real_append = cache_mod._AppendOnlyArray.append
    calls = {"n": 0}

    def fill_up(self, rows):
        calls["n"] += 1
        if calls["n"] > 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(self, rows)

    monkeypatch.setattr(cache_mod._AppendOnlyArray, "append", fill_up)
    with pytest.raises(CrossdiffError) as err:
        collect(config, quiet=True)
    assert "\n" not in str(err.value) and str(err.value).startswith("disk full while writing")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) >= 1
    PairedCache(tmp_path / "c", verify=True, allow_incomplete=True)  # only sealed, intact shards listed
    monkeypatch.undo()
    collect(config, quiet=True)  # space freed: the same command finishes the job
    assert PairedCache(tmp_path / "c", verify=True).manifest["complete"]


def test_collection_memory_does_not_grow_with_the_budget(tmp_path, tiny_pair_paths, texts):
    def peak(budget: int, name: str) -> int:
        tracemalloc.start()
        collect(make_config(tiny_pair_paths, texts, tmp_path / name, max_tokens=budget, shard_tokens=72), quiet=True)
        result = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return result

    peak(50, "warm-up")
    small, large = peak(150, "small"), peak(600, "large")
    assert large < 1.25 * small, (small, large)


def test_cli_collects_verifies_and_reports_corruption(tmp_path, tiny_pair_paths, texts, capsys):
    out = tmp_path / "c"
    argv = [
        "collect", "--base", str(tiny_pair_paths[0]), "--chat", str(tiny_pair_paths[1]), "--layer", "2",
        "--source", f"web:text:{texts['web']}", "--source", f"chat:chat:{texts['chat']}",
        "--out", str(out), "--max-len", "16", "--batch-size", "2", "--shard-tokens", "40", "--max-tokens", "80",
        "--model-dtype", "float32", "--device", "cpu",
    ]
    assert main([*argv, "--quiet"]) == 0  # --quiet hides the progress bar, never the result
    printed = capsys.readouterr().out
    assert "tokens: 160 (web 80, chat 80)" in printed and "tokens/s" in printed
    assert main(["collect", "--verify", str(out), "--quiet"]) == 0
    assert "ok: 160 tokens" in capsys.readouterr().out
    target = out / "shard-00001" / "acts.npy"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    assert main(["collect", "--verify", str(out)]) == 2
    assert capsys.readouterr().err == "crossdiff: error: shard-00001/acts.npy does not match the sha256 recorded in manifest.json: the file or manifest.json is damaged\n"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layer": 9}, r"layer 9 out of range"),
        ({"shard_tokens": 10}, r"shard_tokens \(10\) must hold one full batch"),
        ({"max_tokens": {"fineweb": 10}}, r"max_tokens names unknown source 'fineweb'"),
        ({"sources": [{"name": "web", "kind": "text", "path": "/nonexistent/web.txt"}]}, r"nonexistent"),
        ({"rank": 2, "world_size": 2}, r"rank must be in 0..world_size-1"),
    ],
)
def test_bad_input_is_one_line(tmp_path, tiny_pair_paths, texts, change, message, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({**_as_plain(make_config(tiny_pair_paths, texts, tmp_path / "c")), **change}))
    assert main(["collect", "--config", str(recipe), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("crossdiff: error:"), err
    assert __import__("re").search(message, err), err


def test_unknown_recipe_key_and_changed_settings_are_one_line(tmp_path, tiny_pair_paths, texts, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[collect]\nbase = "{tiny_pair_paths[0]}"\nlayr = 1\n')
    assert main(["collect", "--config", str(recipe)]) == 2
    assert "unknown config key 'layr' (did you mean 'layer'?)" in capsys.readouterr().err
    collect(make_config(tiny_pair_paths, texts, tmp_path / "c", max_tokens=30), quiet=True)
    with pytest.raises(CrossdiffError, match=r"other settings \(layer is 1 there, 2 now\)"):
        collect(make_config(tiny_pair_paths, texts, tmp_path / "c", max_tokens=30, layer=2), quiet=True)
