"""Streaming training (no cache): same tokens as collect, resumable, as good as the cache."""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from crossdiff.cache.store import PairedCache, ReadFilters
from crossdiff.collect.collector import collect
from crossdiff.organism.data import write_demo_data
from crossdiff.run.demo import DemoConfig, demo_recipe
from crossdiff.errors import CrossdiffError
from crossdiff.recipe import recipe_from_dict
from crossdiff.train.stream import PairedActivationStream, train_streaming

pytestmark = pytest.mark.usefixtures("one_thread")
RATIO = {"pretraining": 0.5, "chat": 0.5}
ORGANISM = Path(__file__).parent.parent / "recipes" / "organism.toml"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The organism recipe at a toy size, its texts written and its cache collected once."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("stream") / "run"
    recipe = recipe_from_dict(demo_recipe(DemoConfig(out=str(out), tokens_per_source=3000, behaviour_conversations=10)))
    write_demo_data(recipe.out / "data", recipe.data)
    collect(recipe.collect, quiet=True)
    torch.set_num_threads(before)
    return recipe


def _tokens(batch):
    return list(zip(batch.source_ids.tolist(), batch.doc_ids.tolist(), batch.positions.tolist()))


def test_stream_gives_the_cache_tokens_and_resumes_without_repeats_or_gaps(toy):
    cache = PairedCache(toy.collect.out)
    make = lambda pair=None: PairedActivationStream(toy.collect, 128, buffer_tokens=1024, source_ratio=RATIO, seed=3, pair=pair)  # noqa: E731
    straight = make()
    straight_batches = list(straight)
    sequence = [t for b in straight_batches for t in _tokens(b)]

    # Same tokens as the cache (every one, once), each with the cache's activations.
    index = {}
    for shard in range(len(cache.shards)):
        for row, rec in enumerate(cache.tokens(shard)):
            index[(int(rec["source_id"]), int(rec["doc_id"]), int(rec["position"]))] = (shard, row)
    assert len(set(sequence)) == len(sequence) and set(sequence) <= set(index)
    assert len(index) - len(sequence) < 128  # only the last partial batch is left in the buffer
    scale = torch.tensor(straight.normalization).view(1, 2, 1)
    batch = straight_batches[7]
    expected = torch.stack([cache.read(index[t][0], np.array([index[t][1]])).acts[0] for t in _tokens(batch)])
    torch.testing.assert_close(batch.acts, expected * scale, rtol=1e-6, atol=0)

    # Stop after 5 batches, save the state, resume in a fresh stream: the same sequence.
    first = make(straight.pair)
    taken = []
    for i, b in enumerate(first):
        taken += _tokens(b)
        if i == 4:
            state = first.state_dict()
            break
    first.close()
    resumed = make(straight.pair)
    resumed.load_state_dict(state)
    taken += [t for b in resumed for t in _tokens(b)]
    assert taken == sequence

    with pytest.raises(CrossdiffError, match="cannot resume the stream: buffer_tokens"):
        PairedActivationStream(toy.collect, 128, buffer_tokens=2048, source_ratio=RATIO, seed=3, pair=straight.pair).load_state_dict(state)


def test_filters_and_sources_follow_the_loader(toy):
    from crossdiff.train.loader import source_shares  # the split the cache loader uses too

    assert source_shares(512, {"b": 0.5, "a": 0.5}, ["a", "b"], "the recipe") == {"a": 256, "b": 256}
    assert list(source_shares(10, {"c": 1, "a": 1, "b": 1}, ["a", "b", "c"], "the recipe").values()) == [4, 3, 3]
    stream = PairedActivationStream(toy.collect, 64, buffer_tokens=512, seed=0, filters=ReadFilters(drop_bos=True, drop_special=True))
    seen = [t for b in stream for t in zip(b.positions.tolist(), b.token_ids.tolist())]
    special = set(stream.pair.tokenizer.all_special_ids)
    assert seen and not any(tok in special for _, tok in seen)
    assert not any(pos == 0 and tok == stream.bos_token_id for pos, tok in seen)


def _fve(crosscoder, cache) -> float:
    from crossdiff.train.losses import fraction_of_variance_explained

    x = torch.cat([b.acts for b in cache.iter_batches(4096)]) * torch.tensor(crosscoder.config.input_scale).view(1, 2, 1)
    with torch.no_grad():
        x_hat = crosscoder(x)
    return float(fraction_of_variance_explained(x, x_hat)[-1])


def test_streamed_crosscoder_is_as_good_as_one_trained_from_the_cache(toy, tmp_path):
    from crossdiff.train.loader import ShuffledPairLoader
    from crossdiff.train.trainer import Trainer

    config = dataclasses.replace(toy.crosscoders["batchtopk"], steps=None, batch_size=32, lr=3e-3, warmup_steps=5,
                                 threshold_start_step=10, checkpoint_every=0, expansion_factor=4, k=8, log_every=1000)
    config.data = dataclasses.replace(config.data, epochs=1)
    cache = PairedCache(toy.collect.out)
    loader = ShuffledPairLoader(cache, 32, source_ratio=RATIO, seed=0, epochs=1, normalize=True)
    trainer = Trainer(config, cache.d_model, tmp_path / "cached", input_scale=loader.normalization, quiet=True)
    from_cache = trainer.fit(loader)
    streamed = train_streaming(toy.collect, toy.stream, config, tmp_path / "streamed", quiet=True)
    steps = lambda folder: int(__import__("json").loads((folder / "crosscoder" / "config.json").read_text())["metadata"]["steps"])  # noqa: E731
    assert abs(steps(tmp_path / "streamed") - steps(tmp_path / "cached")) <= 1  # the same number of tokens
    fve_cache, fve_stream = _fve(from_cache, cache), _fve(streamed, cache)
    assert fve_cache > 0.5
    assert fve_stream >= 0.95 * fve_cache, (fve_stream, fve_cache)


def _toy_recipe_file(tmp_path: Path) -> Path:
    text = ORGANISM.read_text()
    for old, new in [("max_tokens = 40_000", "max_tokens = 4_000"), ("behaviour_conversations = 400", "behaviour_conversations = 10"),
                     ("expansion_factor = 8", "expansion_factor = 2"), ("k = 16", "k = 8"), ("steps = 1000", "steps = 60"),
                     ("batch_size = 512", "batch_size = 128"), ("warmup_steps = 100", "warmup_steps = 4"),
                     ("threshold_start_step = 200", "threshold_start_step = 8"), ("checkpoint_every = 500", "checkpoint_every = 4"),
                     ("epochs = 8", "epochs = 1"), ("buffer_tokens = 16_384", "buffer_tokens = 1024\nprefetch_batches = 1")]:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "toy.toml"
    path.write_text(text.replace('out = "runs/demo"', f'out = "{tmp_path / "run"}"'))
    return path


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_the_stream_exactly(tmp_path):
    recipe_file = _toy_recipe_file(tmp_path)
    from crossdiff.recipe import load_recipe
    from crossdiff.run.stages import run_recipe

    run_recipe(load_recipe(recipe_file), only=["data"], quiet=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = lambda out: [sys.executable, "-m", "crossdiff.cli", "train", "--stream", "--config", str(recipe_file),  # noqa: E731
                           "--out", str(out), "--quiet"]
    subprocess.run(command(tmp_path / "straight"), env=env, check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (killed / "checkpoints" / "step-000008").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (killed / "crosscoder").exists()
    subprocess.run(command(killed), env=env, check=True, capture_output=True)

    # The same texts in the same order: the final crosscoder is byte-identical, and so is
    # every text position and buffer the checkpoints recorded.
    final = lambda run: (run / "crosscoder" / "model.safetensors").read_bytes()  # noqa: E731
    assert final(killed) == final(tmp_path / "straight")
    from crossdiff.train.stream import saved_data_state

    a, b = saved_data_state(killed), saved_data_state(tmp_path / "straight")
    assert a["positions"] == b["positions"] and a["step"] == b["step"] == 60
    assert all(torch.equal(x["doc_ids"], y["doc_ids"]) for x, y in zip(a["buffers"], b["buffers"]))
