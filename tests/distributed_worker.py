"""One rank of tests/test_distributed.py, started by torchrun (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py SPEC.json

SPEC.json lists scenarios; each rank runs them all in order (one launch: torchrun's
start-up costs more than the tiny trainings):

* ``train``: train TrainConfig ``config`` on this rank's rows of the synthetic global
  batches into ``out`` (resuming what is there), optionally crashing after ``crash_after``
  batches; every rank saves its final weights to ``out/rank-R.pt`` so the test can check
  that the ranks agree;
* ``cli``: ``crossdiff train`` with ``args`` (the cache loader reads each rank's part);
* ``topk``: the global batch top-k against a brute-force top-k over the gathered batch.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from crossdiff.cli import main as cli_main
from crossdiff.config import from_dict
from crossdiff.train.distributed import DataParallel, rank_slice, split_batches
from crossdiff.synthetic import SyntheticConfig, SyntheticPair
from crossdiff.train.trainer import TrainConfig, Trainer


def synthetic_batches(d_in: int, batch_size: int, seed: int):
    pair = SyntheticPair(SyntheticConfig(d_in=d_in, n_shared=6, n_chat_only=2, n_base_only=2, n_different=2, p_active=0.2))
    return pair.batches(batch_size, seed=seed)


def crashing(batches, after: int):
    for i, batch in enumerate(batches):
        if i == after:
            raise KeyboardInterrupt("simulated crash")
        yield batch


def run_train(spec: dict, rank: int, world_size: int) -> None:
    config = from_dict(TrainConfig, spec["config"])
    batches = split_batches(synthetic_batches(spec["d_in"], config.batch_size, seed=1), rank, world_size)
    if spec.get("crash_after") is not None:
        batches = crashing(batches, spec["crash_after"])
    trainer = Trainer(config, spec["d_in"], spec["out"], quiet=True)
    try:
        trainer.fit(batches)
    except KeyboardInterrupt:
        return
    torch.save({**trainer.model.state_dict(), "tokens_since_fired": trainer.tokens_since_fired}, f"{spec['out']}/rank-{rank}.pt")


def check_topk(spec: dict, rank: int, world_size: int) -> None:
    """Random, tied and mostly-negative pre-activations; ranks of unequal sizes."""
    dp = DataParallel(torch.device("cpu"))
    g = torch.Generator().manual_seed(spec["seed"])
    for case in range(spec["cases"]):
        B, D = 1536 + 16 * case, 512
        pre = torch.randn(B, D, generator=g)
        if case % 3 == 1:
            pre = pre.round(decimals=1)  # many exact ties, also at the cut
        if case % 3 == 2:
            pre = pre - 3.5  # fewer positive entries than kept ones
        code_norm = torch.rand(D, generator=g) + 0.5
        part = rank_slice(B, rank, world_size) if case % 2 else slice(0, B // 3) if rank == 0 else slice(B // 3, B)
        n_keep = 4 * B
        selection = dp.batch_topk(pre[part].contiguous(), code_norm, n_keep, B)
        flat = (selection.rows + part.start) * D + selection.cols
        scaled = (torch.relu(pre) * code_norm).view(-1)
        got = torch.cat(dp.gather_rows(flat))
        assert got.numel() == n_keep and got.unique().numel() == n_keep, (case, got.numel())
        cut = scaled.topk(n_keep).values.min()
        # exactly the top-k: everything above the cut, the rest at the cut
        assert int((scaled[got] >= cut).sum()) == n_keep, case
        assert int((scaled > cut).sum()) == int((scaled[got] > cut).sum()), case


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    for scenario in spec:
        kind = scenario["kind"]
        if kind == "train":
            run_train(scenario, rank, world_size)
        elif kind == "cli":
            assert cli_main(scenario["args"]) == 0
        elif kind == "topk":
            check_topk(scenario, rank, world_size)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
