"""Massive activations on a real model: SmolLM2-135M-Instruct, layer 15 of 30, with the defaults.

Its first position holds an attention sink ~140x the median norm (SmolLM2 adds no BOS, so
`drop_bos` cannot catch it). With the defaults, collect reports the sinks, training leaves
them out and normalises over the rest, and analysis re-applies the recorded filter: an FVE
in [0, 1) and a line saying how many tokens were left out and why.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crossdiff.analysis import AnalysisConfig, analyze
from crossdiff.analysis.table import format_summary
from crossdiff.cache.store import PairedCache
from crossdiff.collect.collector import CollectConfig, collect
from crossdiff.config import from_dict
from crossdiff.crosscoder import CrossCoder
from crossdiff.train.loader import ShuffledPairLoader
from crossdiff.train.trainer import TrainConfig, Trainer


def test_defaults_leave_out_smollm2s_attention_sinks(smollm2_folder, tmp_path, one_thread, capsys):
    from crossdiff import organism

    texts = tmp_path / "text.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in organism.pretraining_texts()[:60]))
    config = from_dict(CollectConfig, {
        "base": str(smollm2_folder), "chat": str(smollm2_folder), "layer": 15, "out": str(tmp_path / "cache"),
        "max_len": 64, "batch_size": 8, "max_tokens": 1500, "dtype": "float32", "model_dtype": "float32", "device": "cpu",
        "shard_tokens": 2048, "sources": [{"name": "text", "kind": "text", "path": str(texts), "column": "text"}]})
    summary = collect(config, quiet=True)
    cache = PairedCache(tmp_path / "cache")
    profile = cache.norm_profile()
    n_docs = profile["first_positions"]
    # Every document's first position is massive (SmolLM2: ~23,000 against a median of ~170).
    assert profile["above_ratio_first_position"] == n_docs > 10
    assert profile["first_position_median"][0] > 50 * profile["median"][0]
    assert f"{profile['above_ratio']:,} of 1,500 tokens above 10x the median norm" in str(summary)

    train = from_dict(TrainConfig, {"expansion_factor": 2, "k": 16, "steps": 40, "batch_size": 128, "lr": 1e-3,
                                    "warmup_steps": 4, "threshold_start_step": 8, "log_every": 1000, "checkpoint_every": 0,
                                    "device": "cpu", "data": {"epochs": None}})  # data: the defaults
    loader = ShuffledPairLoader(cache, train.batch_size, epochs=None, normalize=True, filters=train.data.token_filter(), drop_last=True)
    assert loader.left_out.by_reason.get("first_position") == n_docs
    everything = ShuffledPairLoader(cache, train.batch_size, normalize=True)
    assert loader.normalization[0] > 5 * everything.normalization[0]  # the sinks no longer shrink every token
    trainer = Trainer(train, cache.d_model, tmp_path / "cc", model_names=list(cache.model_names), layer=15,
                      input_scale=loader.normalization, token_filter=loader.token_filter, quiet=True)
    trainer.fit(loader)

    crosscoder = CrossCoder.from_pretrained(tmp_path / "cc" / "crosscoder")
    assert crosscoder.config.metadata["token_filter"]["first_position"] == "drop"
    result = analyze(crosscoder, cache, tmp_path / "analysis", AnalysisConfig(examples=False), progress=False)
    fve = result.summary["quality"]["fve"]
    assert 0 <= fve < 1
    left_out = result.summary["left_out"]
    assert left_out["by_reason"]["first_position"] == n_docs and left_out["left_out"] == profile["above_ratio"]
    assert f"left out {profile['above_ratio']:,} of 1,500 tokens: {n_docs:,} first positions" in format_summary(result.summary)
