"""Data-parallel training: 2 gloo ranks under torchrun train what 1 process with the same
global batch trains (L1, BatchTopK sparse and dense, the CLI on a cache), and runs resume
across rank counts (2 -> 1 and 1 -> 2).

One torchrun launch runs every 2-rank scenario (tests/distributed_worker.py); meanwhile
this process trains the single-process references.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from crossdiff.cache.store import CacheWriter
from crossdiff.cli import main
from crossdiff.config import from_dict
from crossdiff.crosscoder import CrossCoder
from crossdiff.train.loader import ShuffledPairLoader
from crossdiff.partition import largest_forbidden
from crossdiff.train.trainer import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import crashing, synthetic_batches  # noqa: E402

D_IN = 8
COMMON = dict(batch_size=1024, steps=30, lr=1e-2, warmup_steps=3, threshold_start_step=2, dead_after_tokens=4096,
              log_every=5, checkpoint_every=10, seed=3, device="cpu")
CONFIGS = {
    "l1": dict(COMMON, activation="relu", d_sae=64, sparse=False),
    # d_sae 256 at k 2: the sparse selection takes its sampled-bound path (not the small-batch fallback).
    "batchtopk": dict(COMMON, activation="batchtopk", d_sae=256, k=2, sparse=True),
    "batchtopk_dense": dict(COMMON, activation="batchtopk", d_sae=64, k=2, sparse=False),
    # The variants: DFC's gradient mask after the ranks' gradient sum, Matryoshka's prefix terms
    # and Delta's term as shares of the global batch.
    # (At d_sae 64 the DFC run meets an exact float32 tie at the batch top-k boundary at step 8,
    # two tokens of one latent, which split batches break differently: a discrete divergence.)
    "dfc": dict(COMMON, activation="batchtopk", d_sae=256, k=2, sparse=True, variant="dfc", dfc_fractions=[0.25, 0.25]),
    "matryoshka": dict(COMMON, activation="batchtopk", d_sae=64, k=2, sparse=False, variant="matryoshka"),
    "delta": dict(COMMON, activation="batchtopk", d_sae=64, k=2, sparse=True, variant="delta"),
}
CLI_SETTINGS = ["d_sae=64", "k=2", "batch_size=64", "lr=0.01", "warmup_steps=2", "threshold_start_step=1",
                "log_every=3", "checkpoint_every=0", "data.epochs=2", "device=cpu"]
CRASH_AFTER = 17  # batches; the last checkpoint before the crash is step 10


def train(config: dict, out: Path, batches=None) -> Trainer:
    trainer = Trainer(from_dict(TrainConfig, config), D_IN, out, quiet=True)
    trainer.fit(batches if batches is not None else synthetic_batches(D_IN, config["batch_size"], seed=1))
    return trainer


def make_cache(path: Path, n_tokens: int = 480, d: int = D_IN) -> Path:
    writer = CacheWriter(path, models=("base-x", "chat-x"), layer=3, d_model=d, sources=["web"], dtype="float32",
                         shard_tokens=120)
    g = torch.Generator().manual_seed(0)
    for start in range(0, n_tokens, 40):
        if writer.room < 40:
            writer.seal()
        acts = torch.randn(40, 2, d, generator=g) * torch.tensor([1.0, 3.0]).view(1, 2, 1)
        writer.append(acts, [5] * 40, [start // 40] * 40, range(40), 0, [False] * 40)
    writer.seal()
    writer.finish()
    return path


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(reference: Trainer | Path, out: Path) -> None:
    """Weights, threshold, dead-latent counters and logged metrics of the run in ``out``
    equal the reference's (a Trainer, or the output folder of one) up to float rounding
    (sums split over ranks round differently)."""
    if isinstance(reference, Trainer):
        expected_state, reference_out = dict(reference.model.state_dict()), reference.out
        state, other = torch.load(out / "rank-0.pt"), torch.load(out / "rank-1.pt")
        assert all(torch.equal(state[name], other[name]) for name in state)  # every rank ends with the same bits
        assert torch.equal(state["tokens_since_fired"], reference.tokens_since_fired)
    else:
        expected_state, reference_out = dict(CrossCoder.from_pretrained(reference / "crosscoder").state_dict()), reference
        state = dict(CrossCoder.from_pretrained(out / "crosscoder").state_dict())
    for name, expected in expected_state.items():
        torch.testing.assert_close(state[name], expected, rtol=1e-4, atol=1e-5, msg=name)
    got, expected = metrics(out), metrics(reference_out)
    assert [m["step"] for m in got] == [m["step"] for m in expected]
    for g, e in zip(got, expected):
        for key in e:
            if key != "tokens_per_s":
                assert g[key] == pytest.approx(e[key], rel=1e-4, abs=1e-5), (g["step"], key)


@pytest.mark.slow
def test_two_ranks_train_what_one_process_trains(tmp_path, one_thread):
    # A single-process run that crashes after step 10, for the two ranks to resume.
    with pytest.raises(KeyboardInterrupt):
        train(CONFIGS["l1"], tmp_path / "l1-1to2",
              crashing(synthetic_batches(D_IN, COMMON["batch_size"], seed=1), CRASH_AFTER))
    cache = make_cache(tmp_path / "cache")
    spec = [{"kind": "topk", "seed": 0, "cases": 6}]
    spec += [{"kind": "train", "d_in": D_IN, "config": config, "out": str(tmp_path / f"{name}-2")}
             for name, config in CONFIGS.items()]
    spec += [
        {"kind": "train", "d_in": D_IN, "config": CONFIGS["batchtopk"], "out": str(tmp_path / "bt-2to1"),
         "crash_after": CRASH_AFTER},
        {"kind": "train", "d_in": D_IN, "config": CONFIGS["l1"], "out": str(tmp_path / "l1-1to2")},
        {"kind": "cli", "args": ["train", "--cache", str(cache), "--out", str(tmp_path / "cli-2"), "--quiet",
                                 *[a for s in CLI_SETTINGS for a in ("--set", s)]]},
    ]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    launch = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(Path(__file__).parent / "distributed_worker.py"), str(tmp_path / "spec.json")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        references = {name: train(config, tmp_path / f"{name}-1") for name, config in CONFIGS.items()}
        assert main(["train", "--cache", str(cache), "--out", str(tmp_path / "cli-1"), "--quiet",
                     *[a for s in CLI_SETTINGS for a in ("--set", s)]]) == 0
        output, _ = launch.communicate(timeout=600)
    finally:
        launch.kill()
    assert launch.returncode == 0, output[-3000:]

    for name, reference in references.items():
        assert_same_training(reference, tmp_path / f"{name}-2")
    assert references["batchtopk"].model.threshold.item() > 0 and references["batchtopk_dense"].model.threshold.item() > 0
    dfc = CrossCoder.from_pretrained(tmp_path / "dfc-2" / "crosscoder")
    assert dfc.config.dfc_partition == [64, 64] and largest_forbidden(dfc.W_enc, dfc.W_dec, dfc.partition_allowed) == 0.0
    # Interrupted at 2 ranks, finished at 1 (the deterministic stream is skipped to step 10).
    assert sorted(p.name for p in (tmp_path / "bt-2to1" / "checkpoints").iterdir()) == ["step-000010"]
    resumed = train(CONFIGS["batchtopk"], tmp_path / "bt-2to1")
    assert resumed.step == 30
    for name, expected in references["batchtopk"].model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], expected, rtol=1e-4, atol=1e-5, msg=name)
    # Interrupted at 1 rank, finished at 2.
    assert_same_training(references["l1"], tmp_path / "l1-1to2")
    # The CLI on a cache: each rank reads its own part of every batch.
    assert_same_training(tmp_path / "cli-1", tmp_path / "cli-2")


def test_loader_ranks_split_every_batch_into_disjoint_parts(tmp_path):
    cache = make_cache(tmp_path / "cache")
    whole = ShuffledPairLoader(cache, 48, seed=1, epochs=2, source_ratio=None)
    parts = [ShuffledPairLoader(cache, 48, seed=1, epochs=2, rank=r, world_size=3) for r in range(3)]
    n_batches = 0
    for batch, *rank_batches in zip(whole, *parts):
        n_batches += 1
        keys = [np.stack([b.doc_ids.numpy(), b.positions.numpy()], 1) for b in rank_batches]
        assert sum(len(k) for k in keys) == len(batch.acts)
        joined = np.concatenate(keys)
        assert len(np.unique(joined, axis=0)) == len(joined)  # disjoint
        order = np.lexsort(joined.T)
        whole_keys = np.stack([batch.doc_ids.numpy(), batch.positions.numpy()], 1)
        whole_order = np.lexsort(whole_keys.T)
        assert np.array_equal(joined[order], whole_keys[whole_order])
        assert torch.equal(torch.cat([b.acts for b in rank_batches])[torch.from_numpy(order)],
                           batch.acts[torch.from_numpy(whole_order)])
    assert n_batches == len(whole) == 20
    assert all(p.state_dict() == whole.state_dict() for p in parts)  # one position: resumable at any rank count
