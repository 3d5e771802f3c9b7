"""Tokens/s of one crosscoder training step: crossdiff's step against a dense implementation.

    python benchmarks/train_step.py [--d-in 256] [--d-sae 16384] [--k 32] [--batch 4096] [--reps 3]
    python benchmarks/train_step.py --scaling [--threads 2]    # bf16 vs fp32, 2 gloo ranks vs 1

``--scaling`` measures, in one run, (a) the BatchTopK step with ``precision = "bf16"``
against the same step in float32 (same weights and batch, interleaved repetitions; at a
smaller shape, ``--bf16-*``, because a CPU without native bf16 matmuls is slow at it), and
(b) the step of 2 data-parallel ranks (torchrun, gloo, one thread each, half the global
batch each, gradients all-reduced) against 1 process with the same global batch and
``--threads`` threads: same cores, same work.

Both sides compute the same maths (docs/method.md 3) on the same batch and weights, and both
include forward, backward, gradient clipping (BatchTopK) and the Adam step:

* dense baseline: the straightforward version: dense encoder, ReLU, flattened top-k over
  all B*D scaled activations, mask multiply, dense decode, autograd backward;
* crossdiff: ``Trainer._train_step`` (dense encoder matmul, exact batch top-k through
  maxima of 16-token groups and a sampled threshold, decode and weight gradients as
  embedding bags over the selected entries).

Also measured in the same run, next to every repetition: the machine's dense fp32 matmul
rate on the encoder's shape ([B, 2d] @ [2d, D]), to express each step as a fraction of the machine's matmul speed
("useful" FLOPs: those the step cannot avoid; for the sparse step that is the encoder
matmul plus 2 FLOPs per selected entry and model dimension for each sparse product).
Repetitions are interleaved so that a busy machine slows both sides alike; medians are
reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from crossdiff.train.trainer import TrainConfig, Trainer  # noqa: E402


def dense_step(model, optimizer, x, *, activation: str, k: int, mu: float, clip: float) -> None:
    """The reference maths with dense tensors and autograd, nothing clever."""
    B = x.shape[0]
    pre = x.reshape(B, -1) @ model.W_enc.reshape(-1, model.config.d_sae) + model.b_enc
    f = torch.relu(pre)
    code_norm = model.W_dec.norm(dim=-1).sum(dim=-1)
    if activation == "batchtopk":
        keep = (f.detach() * code_norm.detach()).reshape(-1).topk(k * B, sorted=False).indices
        mask = torch.zeros(B * model.config.d_sae, device=x.device)
        mask[keep] = 1.0
        f = f * mask.reshape(f.shape)
    x_hat = (f @ model.W_dec.reshape(model.config.d_sae, -1)).reshape(x.shape) + model.b_dec
    loss = (x - x_hat).norm(dim=-1).mean()
    if activation == "relu":
        loss = loss + mu * (f * code_norm).sum() / B
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()


def make_trainer(activation: str, args, out: Path, sparse: bool) -> Trainer:
    config = TrainConfig(
        activation=activation, d_sae=args.d_sae, k=args.k, batch_size=args.batch, warmup_steps=0,
        threshold_start_step=10**9, sparse=sparse, device="cpu",
    )
    return Trainer(config, args.d_in, out, quiet=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def scaling_trainer(args, out: Path, precision: str = "fp32", d_in=None, d_sae=None, batch=None) -> Trainer:
    config = TrainConfig(
        activation="batchtopk", d_sae=d_sae or args.d_sae, k=args.k, batch_size=batch or args.batch, warmup_steps=0,
        threshold_start_step=10**9, sparse=True, device="cpu", precision=precision,
    )
    return Trainer(config, d_in or args.d_in, out, quiet=True)


def global_batch(args, d_in: int, batch: int) -> torch.Tensor:
    return torch.randn(batch, 2, d_in, generator=torch.Generator().manual_seed(0))


def bench_precision(args, tmp: Path) -> tuple[float, float]:
    """Median step seconds of float32 and bf16 on the same weights and batch."""
    x = global_batch(args, args.bf16_d_in, args.bf16_batch)
    shape = dict(d_in=args.bf16_d_in, d_sae=args.bf16_d_sae, batch=args.bf16_batch)
    fp32, bf16 = scaling_trainer(args, tmp / "fp32", "fp32", **shape), scaling_trainer(args, tmp / "bf16", "bf16", **shape)
    bf16.model.load_state_dict(fp32.model.state_dict())
    fp32._train_step(x), bf16._train_step(x)  # warm-up
    t32, t16 = [], []
    for _ in range(args.reps):
        t32.append(timed(lambda: fp32._train_step(x)))
        t16.append(timed(lambda: bf16._train_step(x)))
    return statistics.median(t32), statistics.median(t16)


def bench_one_process(args, tmp: Path) -> float:
    x = global_batch(args, args.d_in, args.batch)
    trainer = scaling_trainer(args, tmp / "one")
    trainer._train_step(x)
    return statistics.median(timed(lambda: trainer._train_step(x)) for _ in range(args.reps))


def bench_ranks(args, tmp: Path, n_ranks: int = 2) -> float:
    """Median step seconds of ``n_ranks`` gloo ranks on the global batch (slowest rank)."""
    result = tmp / "ranks.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n_ranks}", __file__,
               "--rank-worker", str(result), "--d-in", str(args.d_in), "--d-sae", str(args.d_sae), "--k", str(args.k),
               "--batch", str(args.batch), "--reps", str(args.reps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())["step_s"]


def rank_worker(args) -> None:
    """One rank of bench_ranks: its part of the global batch, full data-parallel steps."""
    import torch.distributed as dist

    from crossdiff.train.distributed import rank_slice

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    x = global_batch(args, args.d_in, args.batch)
    x = x[rank_slice(args.batch, dist.get_rank(), dist.get_world_size())].contiguous()
    trainer = scaling_trainer(args, Path(tempfile.mkdtemp()) / "rank")
    trainer._train_step(x, args.batch)
    times = []
    for _ in range(args.reps):
        dist.barrier()
        start = time.perf_counter()
        trainer._train_step(x, args.batch)
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
    if dist.get_rank() == 0:
        Path(args.rank_worker).write_text(json.dumps({"step_s": statistics.median(times)}))
    dist.destroy_process_group()


def scaling(args) -> None:
    tmp = Path(tempfile.mkdtemp())
    t32, t16 = bench_precision(args, tmp)
    B = args.bf16_batch
    print(f"precision (d_in {args.bf16_d_in}, d_sae {args.bf16_d_sae}, k {args.k}, batch {B}, {args.threads} threads): "
          f"fp32 {B / t32:,.0f} tok/s ({t32:.2f} s), bf16 {B / t16:,.0f} tok/s ({t16:.2f} s), bf16/fp32 speed {t32 / t16:.3f}x",
          flush=True)
    t_one = bench_one_process(args, tmp)
    t_two = bench_ranks(args, tmp)
    B = args.batch
    print(f"ranks (d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, global batch {B}): 1 process x {args.threads} threads "
          f"{B / t_one:,.0f} tok/s ({t_one:.2f} s), 2 gloo ranks x 1 thread {B / t_two:,.0f} tok/s ({t_two:.2f} s), "
          f"2 ranks / 1 process speed {t_one / t_two:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scaling", action="store_true", help="bf16 vs fp32 and 2 gloo ranks vs 1 instead")
    parser.add_argument("--bf16-d-in", type=int, default=64)
    parser.add_argument("--bf16-d-sae", type=int, default=4096)
    parser.add_argument("--bf16-batch", type=int, default=1024)
    parser.add_argument("--rank-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        return rank_worker(args)
    torch.set_num_threads(args.threads)
    if args.scaling:
        return scaling(args)
    B, nd, D = args.batch, 2 * args.d_in, args.d_sae
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 2, args.d_in, generator=g)

    # The machine's rate is re-measured next to every repetition: on a shared machine it
    # moves with the load, and a step is only comparable with the matmul timed beside it.
    a, w, out = torch.randn(B, nd, generator=g), torch.randn(nd, D, generator=g), torch.empty(B, D)
    torch.mm(a, w, out=out)
    matmul_s = statistics.median(timed(lambda: torch.mm(a, w, out=out)) for _ in range(args.reps))
    print(f"machine: fp32 matmul [{B}x{nd}] @ [{nd}x{D}] {2 * B * nd * D / matmul_s / 1e9:.1f} GFLOP/s ({matmul_s:.3f} s), "
          f"{args.threads} threads")

    tmp = Path(tempfile.mkdtemp())
    rows = []
    # (label, activation, crossdiff sparse?, L0 regime) ; the L1 rows differ in the encoder bias:
    # at init about half of all latents fire; a trained L1 crosscoder fires ~k per token.
    cases = [("BatchTopK", "batchtopk", True, None), ("L1 at init (dense step)", "relu", False, None),
             ("L1, b_enc shifted to a sparse regime", "relu", True, "sparse")]
    for label, activation, sparse, regime in cases:
        ours = make_trainer(activation, args, tmp / f"ours-{label}", sparse)
        base = make_trainer(activation, args, tmp / f"base-{label}", False)
        base.model.load_state_dict(ours.model.state_dict())
        if regime == "sparse":
            with torch.no_grad():  # shift biases so that about k latents per token are positive
                pre = x.reshape(B, -1) @ ours.model.W_enc.reshape(-1, D)
                cut = pre.reshape(-1).kthvalue(pre.numel() - args.k * B).values
                for t in (ours, base):
                    t.model.b_enc.fill_(-float(cut))
            del pre
        clip = base.max_grad_norm
        ours._train_step(x)  # warm-up (allocations, first-touch page faults)
        dense_step(base.model, base.optimizer, x, activation=activation, k=args.k, mu=base.config.l1_coefficient, clip=clip)
        t_ours, t_base, t_matmul = [], [], []
        for _ in range(args.reps):
            t_matmul.append(timed(lambda: torch.mm(a, w, out=out)))
            t_base.append(timed(lambda: dense_step(base.model, base.optimizer, x, activation=activation, k=args.k,
                                                   mu=base.config.l1_coefficient, clip=clip)))
            t_ours.append(timed(lambda: ours._train_step(x)))
        t_ours_med, t_base_med = statistics.median(t_ours), statistics.median(t_base)
        machine = 2 * B * nd * D / statistics.median(t_matmul)
        terms = ours._train_step(x)
        nnz = float(terms.l0) * B
        dense_flops = 2 * B * nd * D
        useful = dense_flops + (4 * 2 * nnz * nd if ours.sparse else 4 * dense_flops)
        rows.append((label, B / t_base_med, B / t_ours_med, t_base_med / t_ours_med, useful / t_ours_med / machine, float(terms.l0)))
        print(f"{label}: dense {B / t_base_med:,.0f} tok/s ({t_base_med:.2f} s), crossdiff {B / t_ours_med:,.0f} tok/s "
              f"({t_ours_med:.2f} s), ratio {t_base_med / t_ours_med:.2f}x, {useful / t_ours_med / machine:.0%} of matmul peak, "
              f"L0 {float(terms.l0):.1f}, matmul {machine / 1e9:.0f} GFLOP/s", flush=True)
        del ours, base
    print("\n| step | L0 | dense tokens/s | crossdiff tokens/s | ratio | fraction of matmul FLOP/s |")
    print("|---|---|---|---|---|---|")
    for label, dense_tps, ours_tps, ratio, fraction, l0 in rows:
        print(f"| {label} | {l0:.0f} | {dense_tps:,.0f} | {ours_tps:,.0f} | **{ratio:.2f}x** | {fraction:.0%} |")


if __name__ == "__main__":
    main()
