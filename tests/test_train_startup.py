"""Training that cannot silently produce an unusable crosscoder: start-up warnings, given
weights, and the last metrics line when the data runs out."""

from __future__ import annotations

import itertools
import json
import warnings

import pytest
import torch

from crossdiff.config import from_dict
from crossdiff.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff.errors import CrossdiffError
from crossdiff.synthetic import SyntheticConfig, SyntheticPair
from crossdiff.train.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def config(**overrides) -> TrainConfig:
    base = dict(d_sae=32, k=2, batch_size=16, steps=10, lr=1e-2, warmup_steps=3, threshold_start_step=1,
                dead_after_tokens=32, log_every=5, checkpoint_every=0, seed=3)
    return from_dict(TrainConfig, {**base, **overrides})


def batches(n=None, d_in=8):
    pair = SyntheticPair(SyntheticConfig(d_in=d_in, n_shared=6, n_chat_only=2, n_base_only=2, n_different=2, p_active=0.2))
    return itertools.islice(pair.batches(16, seed=1), n)


def test_a_run_that_ends_before_the_threshold_or_warmup_warns_at_start(tmp_path):
    with pytest.warns(UserWarning, match="threshold_start_step") as record:
        Trainer(config(steps=50, threshold_start_step=100), 8, tmp_path / "a", quiet=True)
    assert "steps // 5 (e.g. 10)" in str(record[0].message)
    with pytest.warns(UserWarning, match="warmup_steps"):
        Trainer(config(steps=50, warmup_steps=60), 8, tmp_path / "b", quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(config(steps=50), 8, tmp_path / "c", quiet=True)  # a sound run: no warning


def test_last_metrics_line_when_the_data_runs_out(tmp_path):
    trainer = Trainer(config(steps=100, log_every=5), 8, tmp_path, quiet=True)
    trainer.fit(batches(7))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 7]


def test_training_starts_from_given_weights(tmp_path):
    trainer = Trainer(config(), 8, tmp_path, quiet=True)
    given = CrossCoder(CrossCoderConfig(d_in=8, d_sae=32, activation="batchtopk", k=2), seed=11)
    with torch.no_grad():
        given.b_dec.fill_(0.25)
    start = {name: p.detach().clone() for name, p in given.named_parameters()}
    trainer.model = given
    trained = trainer.fit(batches(10))
    assert trained is given
    assert not torch.equal(given.W_enc, start["W_enc"]) and not torch.equal(given.W_dec, start["W_dec"])
    assert (given.W_dec - start["W_dec"]).abs().max() < 1.0  # trained from the given weights, not replaced
    assert float(given.threshold) > 0
    # Mismatched weights, or a replacement after training started, are refused.
    other = Trainer(config(), 8, tmp_path / "other", quiet=True)
    with pytest.raises(CrossdiffError, match="d_sae 16"):
        other.model = CrossCoder(CrossCoderConfig(d_in=8, d_sae=16, activation="batchtopk", k=2))
    with pytest.raises(CrossdiffError, match="after training started"):
        trainer.model = given
