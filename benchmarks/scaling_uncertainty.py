"""What the uncertainty and the base direction cost in the analysis pass.

Latent Scaling now keeps its sums also per token block (the jackknife behind every nu's
standard error) and runs a second time along the base decoder. Measured here on the same
batches in one process: the paper's chat-direction sums alone (n_blocks=0, the previous
analysis) against chat + base directions with 20 blocks each (what `analyze` does now).
Encoding is done once beforehand and not timed. Prints both times and their ratio.

    python benchmarks/scaling_uncertainty.py                  # d_in=256, d_sae=8192, L0 32, BatchTopK-like codes
    python benchmarks/scaling_uncertainty.py --dense          # L1-like dense codes (the dense path)
"""

from __future__ import annotations

import argparse
import time

import torch

from crossdiff.analysis.scaling import LatentScaling


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--l0", type=int, default=32)
    parser.add_argument("--dense", action="store_true", help="about 10%% nonzero codes (L1-like)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(args.d_sae, 2, args.d_in, generator=g) / args.d_in**0.5
    batches = []
    for _ in range(args.batches):
        x = torch.randn(args.tokens, 2, args.d_in, generator=g)
        scores = torch.rand(args.tokens, args.d_sae, generator=g)
        keep = args.d_sae // 10 if args.dense else args.l0
        f = torch.zeros_like(scores).scatter(1, scores.topk(keep, dim=1).indices, 1.0) * scores
        x_hat = torch.einsum("bj,jmd->bmd", f, W_dec)
        groups = torch.arange(args.tokens) // 64
        batches.append((f, x, x_hat, groups))

    def run(directions: tuple[str, ...], n_blocks: int) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            scalers = [LatentScaling(W_dec, direction=d, n_blocks=n_blocks) for d in directions]
            start = time.perf_counter()
            for f, x, x_hat, groups in batches:
                for scaler in scalers:
                    scaler.update(f, x, x_hat, groups)
            for scaler in scalers:
                scaler.result()
            best = min(best, time.perf_counter() - start)
        return best

    before = run(("chat",), 0)
    now = run(("chat", "base"), 20)
    kind = "dense (L1-like)" if args.dense else f"sparse, L0 {args.l0}"
    print(f"d_in {args.d_in}, d_sae {args.d_sae}, {args.batches} x {args.tokens} tokens, {kind}, "
          f"{torch.get_num_threads()} threads")
    print(f"chat direction, no uncertainty (before): {before:.3f} s")
    print(f"chat + base directions, 20-block jackknife (now): {now:.3f} s")
    print(f"ratio now / before: {now / before:.2f}")


if __name__ == "__main__":
    main()
