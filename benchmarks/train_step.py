"""Tokens/s of one crosscoder training step: crossdiff's step against a dense implementation.

    python benchmarks/train_step.py [--d-in 256] [--d-sae 16384] [--k 32] [--batch 4096] [--reps 3]

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
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from crossdiff.train import TrainConfig, Trainer  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
