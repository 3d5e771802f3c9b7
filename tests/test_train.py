"""The training loop: planted-feature recovery, exact resume, threshold EMA, bad input, CLI."""

import json

import pytest
import torch

from crossdiff.cache.store import CacheWriter
from crossdiff.cli import main
from crossdiff.config import from_dict
from crossdiff.crosscoder import CrossCoder
from crossdiff.errors import CrossdiffError
from crossdiff.train.loader import ShuffledPairLoader
from crossdiff.synthetic import SyntheticConfig, SyntheticPair
from crossdiff.train.cli import build_config
from crossdiff.train.trainer import TrainConfig, Trainer, synthetic_recovery


def small_config(**overrides) -> TrainConfig:
    base = dict(d_sae=32, k=2, batch_size=16, steps=10, lr=1e-2, warmup_steps=3, decay_fraction=0.3,
                threshold_start_step=1, dead_after_tokens=32, log_every=2, checkpoint_every=4, seed=3)
    return from_dict(TrainConfig, {**base, **overrides})


def synthetic_batches(d_in=8, batch_size=16, seed=1):
    pair = SyntheticPair(SyntheticConfig(d_in=d_in, n_shared=6, n_chat_only=2, n_base_only=2, n_different=2, p_active=0.2))
    return pair.batches(batch_size, seed=seed)


class Crashing:
    """Yields ``after`` batches of ``inner``, then dies like a killed process would."""

    def __init__(self, inner, after):
        self.inner, self.after = inner, after

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            if i == self.after:
                raise KeyboardInterrupt("simulated crash")
            yield batch

    def __getattr__(self, name):  # state_dict / load_state_dict of a resumable loader
        return getattr(self.inner, name)


# ---------------------------------------------------------------------- planted features
def test_batchtopk_recovers_planted_features(tmp_path, one_thread):
    pair = SyntheticPair(SyntheticConfig(d_in=48, n_shared=40, n_chat_only=10, n_base_only=10, n_different=0))
    config = from_dict(TrainConfig, dict(
        d_sae=256, k=4, batch_size=256, steps=2000, lr=3e-3, warmup_steps=50, threshold_start_step=100,
        dead_after_tokens=50_000, log_every=500, checkpoint_every=0,
    ))
    model = Trainer(config, 48, tmp_path, quiet=True).fit(pair.batches(256, seed=1))
    result = synthetic_recovery(model, pair)
    assert result["recovered"] >= 0.9
    dnorm = result["match_dnorm"]
    recovered = result["best_cosines"] > 0.9
    chat_only, shared = pair.features_of("chat_only"), pair.features_of("shared")
    assert bool((dnorm[chat_only][recovered[chat_only]] > 0.9).all())
    shared_dnorm = dnorm[shared][recovered[shared]]
    assert bool(((shared_dnorm > 0.4) & (shared_dnorm < 0.6)).all())
    assert model.threshold.item() > 0  # learned for inference
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["fve_joint"] > 0.95 and last["l0"] == 4


# ---------------------------------------------------------------------- resume
def _final_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = dict(trainer.model.state_dict())
    for i, s in trainer.optimizer.state_dict()["state"].items():
        for name, value in s.items():
            state[f"adam.{i}.{name}"] = value
    state["tokens_since_fired"] = trainer.tokens_since_fired
    return state


@pytest.mark.parametrize("activation,sparse", [("batchtopk", False), ("batchtopk", True), ("relu", False)])
def test_resume_after_crash_is_exact(tmp_path, one_thread, activation, sparse):
    config = small_config(activation=activation, sparse=sparse)
    reference = Trainer(config, 8, tmp_path / "straight", quiet=True)
    reference.fit(synthetic_batches())

    with pytest.raises(KeyboardInterrupt):
        Trainer(config, 8, tmp_path / "crashed", quiet=True).fit(Crashing(synthetic_batches(), after=7))
    assert sorted(p.name for p in (tmp_path / "crashed" / "checkpoints").iterdir()) == ["step-000004"]
    with open(tmp_path / "crashed" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 7, "lo')  # a line the crash cut short
    resumed = Trainer(config, 8, tmp_path / "crashed", quiet=True)
    resumed.fit(synthetic_batches())  # a fresh, deterministic stream: the trainer skips 4 batches

    expected, got = _final_state(reference), _final_state(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    if activation == "batchtopk":
        assert resumed.model.threshold.item() > 0
    metrics = [
        {k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
        for line in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    ]
    straight = [
        {k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
        for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    ]
    assert metrics == straight  # the crashed run's lines after step 4 were replaced, not duplicated
    final = CrossCoder.from_pretrained(tmp_path / "crashed" / "crosscoder")
    assert torch.equal(final.W_dec, reference.model.W_dec)


def _make_cache(path, n_tokens=160, d=8):
    writer = CacheWriter(path, models=("base-x", "chat-x"), layer=3, d_model=d, sources=["web"], dtype="float32", shard_tokens=40)
    g = torch.Generator().manual_seed(0)
    for start in range(0, n_tokens, 20):
        if writer.room < 20:
            writer.seal()
        acts = torch.randn(20, 2, d, generator=g) * torch.tensor([1.0, 3.0]).view(1, 2, 1)
        writer.append(acts, [5] * 20, [start // 20] * 20, range(20), 0, [False] * 20)
    writer.seal()
    writer.finish()
    return path


def test_resume_restores_loader_position(tmp_path, one_thread):
    cache = _make_cache(tmp_path / "cache")
    config = small_config(steps=9)

    def loader():
        return ShuffledPairLoader(cache, 16, seed=config.seed, epochs=None, normalize=True)

    reference = Trainer(config, 8, tmp_path / "straight", quiet=True)
    reference.fit(loader())
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, 8, tmp_path / "crashed", quiet=True).fit(Crashing(loader(), after=6))
    fresh = loader()
    resumed = Trainer(config, 8, tmp_path / "crashed", quiet=True)
    resumed.fit(fresh)
    assert fresh.step == 9  # position came from the checkpoint, not from skipping
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


# ---------------------------------------------------------------------- threshold, schedule
def test_threshold_follows_ema_of_smallest_selected(tmp_path, one_thread):
    records = []

    class Recording(Trainer):
        def _train_step(self, x):
            index = self.step
            terms = super()._train_step(x)
            records.append((index, terms.min_selected.item(), self.model.threshold.item()))
            return terms

    config = small_config(threshold_start_step=3, threshold_beta=0.9, steps=8)
    Recording(config, 8, tmp_path, quiet=True).fit(synthetic_batches())
    theta = -1.0
    for index, batch_min, after in records:
        if index > 3:  # the reference's `step > threshold_start_step`, 0-based
            theta = batch_min if theta < 0 else 0.9 * theta + 0.1 * batch_min
        assert after == pytest.approx(theta, rel=1e-6), index
    assert theta > 0


def test_learning_rate_schedule():
    config = TrainConfig(lr=1.0, warmup_steps=4, steps=20, decay_fraction=0.25)
    assert [config.lr_at(s) for s in (0, 2, 4, 14)] == [0.0, 0.5, 1.0, 1.0]
    assert config.lr_at(15) == pytest.approx(1.0) and config.lr_at(18) == pytest.approx(0.4)
    assert TrainConfig(lr=1e-4, warmup_steps=0).lr_at(0) == 1e-4


def test_decoder_bias_starts_at_geometric_median(tmp_path, one_thread):
    from crossdiff.train.losses import geometric_median

    first = next(iter(synthetic_batches()))
    trainer = Trainer(small_config(steps=1, lr=1e-9, warmup_steps=0), 8, tmp_path, quiet=True)
    trainer.fit([first])
    torch.testing.assert_close(trainer.model.b_dec.detach(), geometric_median(first), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------- bad input
def test_wrong_shapes_and_types_are_one_line_errors(tmp_path):
    trainer = Trainer(small_config(), 8, tmp_path, quiet=True)
    with pytest.raises(CrossdiffError, match=r"batch at step 1 has shape \[16, 2, 5\], expected \[batch, 2, 8\]"):
        trainer.fit([torch.zeros(16, 2, 5)], resume=False)
    with pytest.raises(CrossdiffError, match="tensors"):
        Trainer(small_config(), 8, tmp_path / "b", quiet=True).fit([[1, 2]])


def test_nan_batch_stops_with_step_number(tmp_path):
    batches = [torch.randn(16, 2, 8) for _ in range(3)]
    batches[2][5, 1, 3] = float("inf")
    with pytest.raises(CrossdiffError, match="^batch at step 3 contains NaN or inf activations$"):
        Trainer(small_config(), 8, tmp_path, quiet=True).fit(batches)


def test_config_errors(tmp_path):
    with pytest.raises(CrossdiffError, match="unknown config key 'learning_rate'"):
        build_config(None, ["learning_rate=1e-3"])
    with pytest.raises(CrossdiffError, match="unknown config key 'data.epoch'"):
        build_config(None, ["data.epoch=2"])
    assert build_config(None, ["data.epochs=2", "activation=relu", "k=7"]).data.epochs == 2
    with pytest.raises(CrossdiffError, match="'activation' must be one of"):
        build_config(None, ["activation=l1"])


def test_checkpoint_missing_a_file(tmp_path, one_thread):
    config = small_config(steps=4, checkpoint_every=4)
    Trainer(config, 8, tmp_path, quiet=True).fit(synthetic_batches())
    (tmp_path / "checkpoints" / "step-000004" / "training_state.pt").unlink()
    with pytest.raises(CrossdiffError, match="step-000004 is missing training_state.pt"):
        Trainer(small_config(steps=8), 8, tmp_path, quiet=True).fit(synthetic_batches())


def test_resume_with_changed_architecture_is_refused(tmp_path, one_thread):
    Trainer(small_config(steps=4), 8, tmp_path, quiet=True).fit(synthetic_batches())
    with pytest.raises(CrossdiffError, match="config key 'k' was 2"):
        Trainer(small_config(steps=8, k=3), 8, tmp_path, quiet=True).fit(synthetic_batches())


# ---------------------------------------------------------------------- CLI
def test_cli_train_on_cache_stores_provenance(tmp_path, capsys, one_thread):
    cache = _make_cache(tmp_path / "cache")
    out = tmp_path / "run"
    args = ["train", "--cache", str(cache), "--out", str(out), "--quiet",
            "--set", "d_sae=32", "--set", "k=2", "--set", "batch_size=16", "--set", "data.epochs=2",
            "--set", "warmup_steps=2", "--set", "log_every=5"]
    assert main(args) == 0
    model = CrossCoder.from_pretrained(out / "crosscoder")
    assert model.config.model_names == ["base-x", "chat-x"] and model.config.layer == 3
    assert model.config.input_scale[1] == pytest.approx(model.config.input_scale[0] / 3, rel=0.15)
    assert model.config.metadata["training"]["k"] == 2 and model.config.metadata["steps"] == 20
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert {"step", "tokens", "loss", "recon", "aux", "fve_base", "fve_chat", "fve_joint", "l0", "dead_fraction",
            "lr", "threshold"} <= set(json.loads(lines[-1]))
    assert "crosscoder written to" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--synthetic", "--out", str(tmp_path), "--set", "bogus=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("crossdiff: error: unknown config key 'bogus'") and "\n" not in err
    assert main(["train", "--cache", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "\n" not in capsys.readouterr().err.strip()


def test_cli_synthetic_runs_end_to_end(tmp_path, capsys, one_thread):
    out = tmp_path / "syn"
    assert main(["train", "--synthetic", "--out", str(out), "--quiet", "--set", "steps=20", "--set", "batch_size=64"]) == 0
    assert "recovered" in capsys.readouterr().out
    assert (out / "crosscoder" / "model.safetensors").is_file()
