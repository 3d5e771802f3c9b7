"""Own activations in: a cache written from arrays reads back exactly, normalises like a
collected cache, and trains and analyses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crossdiff.analysis import AnalysisConfig, analyze
from crossdiff.errors import CrossdiffError
from crossdiff.cache.from_arrays import write_cache
from crossdiff.train.loader import ShuffledPairLoader
from crossdiff.train.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_arrays_to_cache_to_crosscoder(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 1500, 8
    acts = rng.normal(size=(n, 2, d)).astype(np.float32) * np.array([1.0, 3.0], np.float32)[None, :, None]
    source_ids = (np.arange(n) >= 1000).astype(np.int64)  # 1000 "web" tokens, then 500 "chat"
    doc_ids = np.arange(n) // 50
    positions = np.arange(n) % 50
    template = rng.random(n) < 0.1
    token_ids = rng.integers(0, 100, n)
    cache = write_cache(tmp_path / "cache", acts, token_ids, doc_ids=doc_ids, positions=positions,
                        source_ids=source_ids, sources=["web", "chat"], template=template, models=("my/base", "my/chat"),
                        layer=3, shard_tokens=400)
    assert cache.n_tokens == n and cache.sources == ["web", "chat"] and cache.layer == 3
    assert cache.model_names == ("my/base", "my/chat") and cache.manifest["tokens_per_source"] == {"web": 1000, "chat": 500}
    assert all(len({shard["source"]}) == 1 for shard in cache.shards)
    back = [b for b in cache.iter_batches(256)]
    got = torch.cat([b.acts for b in back]).numpy()
    np.testing.assert_array_equal(got, acts)  # sources were already in order: the stored order is the given order
    np.testing.assert_array_equal(torch.cat([b.token_ids for b in back]).numpy(), token_ids)
    np.testing.assert_array_equal(torch.cat([b.template for b in back]).numpy(), template)
    np.testing.assert_array_equal(torch.cat([b.positions for b in back]).numpy(), positions)
    # Normalisation as for a collected cache: E||x||^2 = d_model per model after scaling.
    loader = ShuffledPairLoader(cache, 128, normalize=True, epochs=None, drop_last=True)
    for m in range(2):
        assert loader.normalization[m] == pytest.approx(math.sqrt(d / (acts[:, m] ** 2).sum(-1).mean()), rel=1e-6)

    config = TrainConfig(activation="batchtopk", d_sae=16, k=2, steps=30, batch_size=128, warmup_steps=3,
                         threshold_start_step=5, dead_after_tokens=10_000, log_every=10, checkpoint_every=0)
    cc = Trainer(config, d, tmp_path / "cc", model_names=list(cache.model_names), layer=cache.layer,
                 input_scale=loader.normalization, quiet=True).fit(loader)
    result = analyze(cc, cache, tmp_path / "analysis", AnalysisConfig(n_top=3, quantile_bins=0), progress=False)
    assert result.summary["n_tokens"] == n and set(result.summary["n_tokens_per_source"]) == {"web", "chat"}


def test_bad_arrays_are_one_line_errors(tmp_path):
    acts = np.zeros((10, 2, 4), np.float32)
    with pytest.raises(CrossdiffError, match="one value per token"):
        write_cache(tmp_path / "a", acts, np.zeros(9))
    with pytest.raises(CrossdiffError, match=r"\[tokens, 2, d_model\]"):
        write_cache(tmp_path / "b", np.zeros((10, 3, 4)), np.zeros(10))
    with pytest.raises(CrossdiffError, match="source_ids must index"):
        write_cache(tmp_path / "c", acts, np.zeros(10), source_ids=np.ones(10, np.int64))
    write_cache(tmp_path / "d", acts, np.zeros(10))
    with pytest.raises(CrossdiffError, match="already holds a cache"):
        write_cache(tmp_path / "d", acts, np.zeros(10))
