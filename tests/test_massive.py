"""Massive activations: the one token filter (crossdiff.cache.store.ReadFilters), its norm profile,
the normalisation over kept tokens, and the filter recorded with a crosscoder and re-applied
by analysis and the causal conditions. Checked against brute force on small caches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crossdiff.analysis import AnalysisConfig, analyze
from crossdiff.cache.store import CacheWriter, LeftOut, PairedCache, ReadFilters, norm_profile
from crossdiff.causal.conditions import Conditions
from crossdiff.errors import CrossdiffError
from crossdiff.train.loader import ShuffledPairLoader
from crossdiff.train.trainer import DataConfig, TrainConfig, Trainer

D = 8
DOC_LEN = 12
SINK = 150.0  # how much larger the first position is, as on SmolLM2 at its middle layer


def sink_cache(path, n_docs=40, *, sink=SINK, outliers=((3, 5), (7, 9)), seed=0) -> PairedCache:
    """Documents whose position 0 is ``sink`` x larger (an attention sink) and a few mid-document
    tokens (doc, position) 30x larger; the rest a low-rank signal, so a crosscoder can fit it."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(4, 2, D, generator=gen)
    sink_direction = torch.randn(2, D, generator=gen)  # a direction of its own, as a real attention sink
    writer = CacheWriter(path, models=("b", "c"), layer=0, d_model=D, sources=["web"], dtype="float32",
                         shard_tokens=5 * DOC_LEN, bos_token_id=None)
    for doc in range(n_docs):
        if writer.room < DOC_LEN:
            writer.seal()
        acts = torch.einsum("nk,kmd->nmd", torch.randn(DOC_LEN, 4, generator=gen), basis)
        acts += 0.05 * torch.randn(DOC_LEN, 2, D, generator=gen)
        acts[0] = sink * acts[0].norm(dim=-1, keepdim=True) * sink_direction / sink_direction.norm(dim=-1, keepdim=True)
        for d, p in outliers:
            if d == doc:
                acts[p] *= 30
        writer.append(acts, list(range(10, 10 + DOC_LEN)), [doc] * DOC_LEN, range(DOC_LEN), 0, [False] * DOC_LEN)
    writer.seal()
    writer.finish()
    return PairedCache(path)


def all_records(cache):
    return np.concatenate([np.asarray(cache.tokens(i)) for i in range(len(cache.shards))])


def test_reasons_match_brute_force():
    rng = np.random.default_rng(0)
    n = 200
    positions = rng.integers(0, 5, n)
    token_ids = rng.integers(0, 6, n)
    norms = rng.uniform(0, 3, (n, 2)).astype(np.float32)
    f = ReadFilters(first_position="drop", max_norm_ratio=2.0, drop_bos=True, drop_special=True, max_norm=[2.0, 2.5])
    reasons = f.reasons(positions, token_ids, norms, bos_token_id=1, special_token_ids=[4, 5])
    for i in range(n):  # each token under its first reason, in the documented order
        expected = ("first_position" if positions[i] == 0 else "bos" if False else
                    "special" if token_ids[i] in (4, 5) else "norm" if norms[i, 0] > 2.0 or norms[i, 1] > 2.5 else None)
        got = [name for name, mask in reasons.items() if mask[i]]
        assert got == ([expected] if expected else []), i
    np.testing.assert_array_equal(f.keep(positions, token_ids, norms, 1, [4, 5]), ~np.any(list(reasons.values()), axis=0))
    with pytest.raises(ValueError, match="resolve"):
        ReadFilters().reasons(positions, token_ids, norms)
    with pytest.raises(CrossdiffError, match="first_position"):
        ReadFilters(first_position="sometimes")


def test_resolve_drops_first_positions_only_where_they_are_massive():
    profile = {"median": [10.0, 20.0], "first_position_median": [150.0, 30.0]}
    massive = ReadFilters().resolve(profile)
    assert massive.first_position == "drop" and massive.max_norm == [100.0, 200.0]
    ordinary = ReadFilters().resolve({**profile, "first_position_median": [17.0, 34.0]})  # the organism: ~1.7x
    assert ordinary.first_position == "keep"
    assert ReadFilters(first_position="keep").resolve(profile).first_position == "keep"
    off = ReadFilters(first_position="auto", max_norm_ratio=None).resolve(profile)
    assert off.first_position == "keep" and off.max_norm is None
    assert massive.resolve({"median": [1.0, 1.0]}) is massive  # resolved once, kept as recorded


def test_norm_profile_is_recorded_at_collection_and_matches_brute_force(tmp_path):
    cache = sink_cache(tmp_path / "c")
    records = all_records(cache)
    norms = records["norm"].astype(np.float64)
    profile = cache.manifest["norms"]
    np.testing.assert_allclose(profile["median"], np.median(norms, axis=0))
    np.testing.assert_allclose(profile["first_position_median"], np.median(norms[records["position"] == 0], axis=0))
    above = (records["norm"] > (10 * np.median(norms, axis=0)).astype(np.float32)).any(axis=1)
    assert profile["above_ratio"] == int(above.sum()) == 40 + 2
    assert profile["above_ratio_first_position"] == 40
    assert profile["above_ratio_by_position"] == {"0": 40, "5": 1, "9": 1}
    # A cache from before the profile existed gets the same one from its records.
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    del manifest["norms"]
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    assert PairedCache(tmp_path / "c").norm_profile() == profile


def test_loader_leaves_out_massive_tokens_and_normalises_over_the_rest(tmp_path):
    cache = sink_cache(tmp_path / "c")
    loader = ShuffledPairLoader(cache, 16, filters=ReadFilters(), normalize=True, seed=0)
    records = all_records(cache)
    limit = (10 * np.median(records["norm"].astype(np.float64), axis=0)).astype(np.float32)
    kept = (records["position"] != 0) & (records["norm"] <= limit).all(axis=1)
    got = torch.cat([b.acts for b in loader])
    assert len(got) == kept.sum() == 40 * DOC_LEN - 42
    raw = torch.cat([b.acts for b in cache.iter_batches(1000)]).double()[torch.from_numpy(kept)]
    expected = [(D / raw[:, m].pow(2).sum(-1).mean()).sqrt().item() for m in range(2)]
    np.testing.assert_allclose(loader.normalization, expected, rtol=1e-6)
    np.testing.assert_allclose(got.double().pow(2).sum(-1).mean(0).numpy(), [D, D], rtol=1e-5)
    left = loader.left_out
    assert left.by_reason == {"first_position": 40, "norm": 2} and left.by_position == {0: 40, 5: 1, 9: 1}
    assert left.line() == f"left out 42 of {40 * DOC_LEN:,} tokens: 40 first positions, 2 above 10x the median norm"
    assert LeftOut.from_dict(left.to_dict()).line() == left.line()
    # Without a filter every token is used and the scale is the manifest's, as before.
    plain = ShuffledPairLoader(cache, 16, normalize=True)
    stats = cache.stats()
    assert plain.normalization == [(D / stats[m]["mean_sq_norm"]) ** 0.5 for m in ("base", "chat")]
    assert plain.normalization[0] < loader.normalization[0] / 10  # the sinks shrink every other token


def small_train_config(**data) -> TrainConfig:
    return TrainConfig(expansion_factor=4, k=4, steps=150, batch_size=64, lr=3e-3, warmup_steps=10, threshold_start_step=20,
                       log_every=1000, checkpoint_every=0, device="cpu", data=DataConfig(epochs=None, **data))


def train(cache, out, config):
    loader = ShuffledPairLoader(cache, config.batch_size, epochs=None, normalize=True, filters=config.data.token_filter(), drop_last=True)
    trainer = Trainer(config, cache.d_model, out, model_names=list(cache.model_names), layer=cache.layer,
                      input_scale=loader.normalization, token_filter=loader.token_filter, quiet=True)
    return trainer.fit(loader)


def test_the_filter_is_recorded_with_the_crosscoder_and_reapplied_by_analysis(tmp_path, one_thread):
    cache = sink_cache(tmp_path / "c")
    cc = train(cache, tmp_path / "cc", small_train_config())
    from crossdiff.crosscoder import CrossCoder

    saved = CrossCoder.from_pretrained(tmp_path / "cc" / "crosscoder")
    recorded = saved.config.metadata["token_filter"]
    assert recorded["first_position"] == "drop" and recorded["max_norm_ratio"] == 10.0 and len(recorded["max_norm"]) == 2
    result = analyze(saved, cache, tmp_path / "an", AnalysisConfig(examples=False), progress=False)
    summary = result.summary
    assert summary["n_tokens"] == 40 * DOC_LEN - 42
    assert summary["left_out"]["by_reason"] == {"first_position": 40, "norm": 2}
    assert 0 <= summary["quality"]["fve"] < 1
    from crossdiff.analysis.table import format_summary

    assert "left out 42 of 480 tokens: 40 first positions, 2 above 10x the median norm" in format_summary(summary)
    # Asked not to, analysis reads every token: the sinks, never trained on, swamp the FVE.
    every = analyze(saved, cache, tmp_path / "an-all", AnalysisConfig(examples=False, token_filter=False), progress=False)
    assert every.summary["n_tokens"] == 40 * DOC_LEN and every.summary["quality"]["fve"] < 0
    # The recorded limits are absolute: another cache is filtered by the training cache's norms.
    other = sink_cache(tmp_path / "other", n_docs=10, sink=1.0, outliers=((2, 4),), seed=1)
    result = analyze(saved, other, tmp_path / "an-other", AnalysisConfig(examples=False), progress=False)
    assert result.summary["left_out"]["by_reason"] == {"first_position": 10, "norm": 1}


def test_a_crosscoder_without_a_recorded_filter_is_analysed_on_every_token(tmp_path, one_thread, capsys):
    cache = sink_cache(tmp_path / "c")
    cc = train(cache, tmp_path / "cc", small_train_config(first_position="keep", max_norm_ratio=None))
    cc.config.metadata.pop("token_filter")  # as trained before the filter was recorded
    result = analyze(cc, cache, tmp_path / "an", AnalysisConfig(examples=False), progress=False)
    assert result.summary["n_tokens"] == 40 * DOC_LEN and result.summary["left_out"]["left_out"] == 0
    assert "records no token filter" in capsys.readouterr().out


def test_causal_latents_are_zero_on_left_out_tokens(tmp_path, one_thread):
    cache = sink_cache(tmp_path / "c")
    cc = train(cache, tmp_path / "cc", small_train_config(max_norm_ratio=None, first_position="drop"))
    batch = next(cache.iter_batches(2 * DOC_LEN))
    conditions = Conditions(cc, [])
    h_base, h_chat = batch.acts[:, 0], batch.acts[:, 1]
    f = conditions.encode(h_base, h_chat, batch.positions, batch.token_ids)
    unfiltered = conditions.encode(h_base, h_chat)
    first = batch.positions == 0
    assert (f[first] == 0).all() and unfiltered[first].abs().sum() > 0
    torch.testing.assert_close(f[~first], unfiltered[~first])
    assert torch.equal(conditions.residual("All", h_base, h_chat, f, batch.template)[first], h_base[first])
