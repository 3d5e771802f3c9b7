"""bf16 mixed precision: the products run in bf16, the master state stays float32, and
training on planted features ends where float32 training ends (within bf16 rounding)."""

import json

import pytest
import torch

from crossdiff.config import from_dict
from crossdiff.train.losses import crosscoder_losses
from crossdiff.synthetic import SyntheticConfig, SyntheticPair
from crossdiff.train.trainer import TrainConfig, Trainer, synthetic_recovery

# This CPU has no native bf16 matmul (~100x slower than float32): keep the model tiny.
PAIR = SyntheticConfig(d_in=16, n_shared=12, n_chat_only=4, n_base_only=4, n_different=0, p_active=0.05)


def train(tmp_path, precision: str, sparse: bool) -> Trainer:
    config = from_dict(TrainConfig, dict(
        activation="batchtopk", d_sae=64, k=2, batch_size=128, steps=250, lr=1e-2, warmup_steps=20,
        threshold_start_step=50, dead_after_tokens=5_000, log_every=50, checkpoint_every=0,
        sparse=sparse, precision=precision, device="cpu",
    ))
    trainer = Trainer(config, PAIR.d_in, tmp_path / f"{precision}-{sparse}", quiet=True)
    trainer.fit(SyntheticPair(PAIR).batches(128, seed=1))
    return trainer


def test_bf16_training_tracks_fp32_with_fp32_master_state(tmp_path, one_thread):
    fp32, bf16 = train(tmp_path, "fp32", sparse=True), train(tmp_path, "bf16", sparse=True)
    # Master weights, Adam moments and the threshold stay float32.
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    assert bf16.model.threshold.dtype == torch.float32 and bf16.model.threshold.item() > 0
    moments = [v for s in bf16.optimizer.state.values() for v in s.values() if v.dim() > 0]
    assert moments and all(v.dtype == torch.float32 for v in moments)
    # bf16 really ran (the weights differ) ...
    assert (bf16.model.W_dec - fp32.model.W_dec).abs().max() > 1e-4
    # ... and lands where float32 does: same planted features found, same fit.
    pair = SyntheticPair(PAIR)
    found_fp32, found_bf16 = synthetic_recovery(fp32.model, pair), synthetic_recovery(bf16.model, pair)
    assert found_fp32["recovered"] >= 0.8 and found_bf16["recovered"] >= found_fp32["recovered"] - 0.1
    last = {p: json.loads((t.out / "metrics.jsonl").read_text().splitlines()[-1]) for p, t in (("fp32", fp32), ("bf16", bf16))}
    assert last["fp32"]["fve_joint"] > 0.8
    assert last["bf16"]["fve_joint"] == pytest.approx(last["fp32"]["fve_joint"], abs=0.01)
    assert bf16.model.threshold.item() == pytest.approx(fp32.model.threshold.item(), rel=0.1)


@pytest.mark.parametrize("sparse", [False, True])
def test_bf16_products_round_like_bf16(one_thread, sparse):
    """One loss evaluation under autocast: the reconstruction moves by bf16 rounding (not
    0, not more), and a bf16 batch is consumed as it is. (ReLU: a top-k selection could
    flip at near-ties and move it by more.)"""
    from crossdiff.crosscoder import CrossCoder, CrossCoderConfig

    model = CrossCoder(CrossCoderConfig(d_in=16, d_sae=64, activation="relu", norm_init_scale=1.0), seed=0)
    x = SyntheticPair(PAIR).sample(256, torch.Generator().manual_seed(0)).acts
    exact = crosscoder_losses(model, x, sparse=sparse)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = crosscoder_losses(model, x.bfloat16(), sparse=sparse)
    relative = (mixed.x_hat - exact.x_hat).norm() / exact.x_hat.norm()
    assert mixed.x_hat.dtype == torch.float32 and mixed.loss.dtype == torch.float32
    assert 1e-4 < relative < 1e-2  # bf16 keeps 8 bits: 2^-9 = 2e-3 relative per rounding
    mixed.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_bf16_batches_stay_bf16_only_for_bf16_runs(tmp_path):
    batch = torch.randn(8, 2, 4).bfloat16()
    for precision, expected in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        trainer = Trainer(TrainConfig(d_sae=8, k=2, precision=precision, device="cpu"), 4, tmp_path / precision, quiet=True)
        assert trainer._prepare(batch).dtype == expected


def test_cli_precision_flag_reaches_the_run(tmp_path, one_thread, capsys):
    from crossdiff.cli import main

    out = tmp_path / "run"
    assert main(["train", "--synthetic", "--out", str(out), "--quiet", "--precision", "bf16",
                 "--set", "steps=2", "--set", "batch_size=64", "--set", "log_every=1"]) == 0
    assert json.loads((out / "train_config.json").read_text())["precision"] == "bf16"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
