"""Latent Scaling for all latents: one-pass sums vs per-latent leave-one-out targets.

Baseline (what the reference code does): for every latent j build its own leave-one-out
error target y_j = h_m - x_hat_m + f_j W_dec[j, m] as a (latents x tokens x d) tensor
(in latent chunks so it fits in memory), then project onto d_j and weight by f_j; the
reconstruction targets are projected per latent the same way.

crossdiff (crossdiff.analysis.scaling.LatentScaling): accumulate
sum_x f_j <d_j, t(x)> for the four shared targets t in {e_base, e_chat, x_hat_base,
x_hat_chat} and sum_x f_j^2, and add the leave-one-out term <d_j, W_dec[j, m]> sum f_j^2
at the end; only the (token, latent) pairs with f_j != 0 are touched for sparse codes.

Both run on the same batches in the same process; encoding (identical for both) is done
once beforehand and not timed. The betas of both are checked to agree, then the ratio of
wall times is printed.

    python benchmarks/latent_scaling.py                 # d_in=256, d_sae=8192, 2 x 1024 tokens
    python benchmarks/latent_scaling.py --tokens 4096 --l0 100
"""

from __future__ import annotations

import argparse
import time

import torch

from crossdiff.analysis.scaling import LatentScaling
from crossdiff.crosscoder import CrossCoder, CrossCoderConfig


def baseline_numerators(cc: CrossCoder, batches, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-latent targets materialised, as in the reference implementation."""
    W = cc.W_dec
    D = W.shape[0]
    d = W[:, 1]  # chat decoder: the direction for both models
    num = torch.zeros(D, 4, dtype=torch.float64)
    sum_f2 = torch.zeros(D, dtype=torch.float64)
    count = torch.zeros(D, dtype=torch.int64)
    for f, x, x_hat in batches:
        for start in range(0, D, chunk):
            j = slice(start, start + chunk)
            fj = f[:, j].T  # [c, B]
            for m in (0, 1):
                # Leave-one-out error target of every latent of the chunk: [c, B, d].
                target = x[None, :, m] - x_hat[None, :, m] + fj[:, :, None] * W[j, m][:, None, :]
                num[j, m] += torch.einsum("cbd,cd,cb->c", target, d[j], fj).double()
                # Reconstruction target, projected per latent.
                num[j, 2 + m] += torch.einsum("bd,cd,cb->c", x_hat[:, m], d[j], fj).double()
            sum_f2[j] += fj.double().square().sum(1)
            count[j] += (fj > 0).sum(1)
    return num, sum_f2, count


def betas_from(num: torch.Tensor, sum_f2: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    d2 = W[:, 1].double().square().sum(-1)
    return num / (d2 * sum_f2)[:, None]


def make_crosscoder(d_in: int, d_sae: int, l0: float, probe: torch.Tensor) -> CrossCoder:
    cc = CrossCoder(CrossCoderConfig(d_in=d_in, d_sae=d_sae, activation="batchtopk", k=max(1, int(l0)),
                                     norm_init_scale=1.0), seed=0)
    with torch.no_grad():
        cc.W_dec.add_(0.3 * torch.randn(cc.W_dec.shape, generator=torch.Generator().manual_seed(1)))
        # Threshold at the quantile that leaves about l0 active latents per token.
        scaled = cc.scale(torch.relu(cc.pre_activations(probe)))
        cc.threshold.fill_(float(torch.quantile(scaled.flatten()[:2_000_000], 1 - l0 / d_sae)))
    return cc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--l0", type=float, default=100.0, help="active latents per token (paper: k=100)")
    parser.add_argument("--chunk", type=int, default=256, help="latents per materialised chunk in the baseline")
    args = parser.parse_args()
    torch.manual_seed(0)

    acts = torch.randn(args.tokens, 2, args.d_in)
    acts[:, 1] = 0.8 * acts[:, 0] + 0.6 * acts[:, 1]
    cc = make_crosscoder(args.d_in, args.d_sae, args.l0, acts[: args.batch_size])
    with torch.no_grad():
        batches = []
        for x in acts.split(args.batch_size):
            f = cc.encode(x)
            batches.append((f, x, cc.decode(f)))
        l0 = sum(float((f > 0).sum()) for f, _, _ in batches) / args.tokens

        start = time.perf_counter()
        scaler = LatentScaling(cc.W_dec)
        for f, x, x_hat in batches:
            scaler.update(f, x, x_hat)
        fast = scaler.result()
        t_fast = time.perf_counter() - start

        start = time.perf_counter()
        num, sum_f2, count = baseline_numerators(cc, batches, args.chunk)
        t_base = time.perf_counter() - start

    # Same answer: the baseline's leave-one-out numerators already contain the latent's own term.
    reference = betas_from(num, sum_f2, cc.W_dec.detach())
    fired = count > 0
    ours = torch.stack([torch.from_numpy(fast.beta_error_base), torch.from_numpy(fast.beta_error_chat),
                        torch.from_numpy(fast.beta_recon_base), torch.from_numpy(fast.beta_recon_chat)], dim=1)
    # float32 products either way: compare each target's betas on the scale of that target.
    scale = reference[fired].abs().amax(dim=0)
    max_rel = float(((ours[fired] - reference[fired]).abs() / scale).max())
    assert torch.equal(torch.from_numpy(fast.n_tokens), count), "token counts differ"
    assert max_rel < 1e-4, f"betas differ (max difference {max_rel:.2e} of the largest beta)"

    print(f"d_in={args.d_in} d_sae={args.d_sae} tokens={args.tokens} batch={args.batch_size} "
          f"L0={l0:.1f} threads={torch.get_num_threads()}")
    print(f"baseline (per-latent leave-one-out targets): {t_base:8.3f} s  ({args.tokens / t_base:,.0f} tokens/s)")
    print(f"crossdiff one-pass sums:                     {t_fast:8.3f} s  ({args.tokens / t_fast:,.0f} tokens/s)")
    print(f"betas agree (max difference {max_rel:.1e} of the largest |beta|); speed-up {t_base / t_fast:.1f}x")


if __name__ == "__main__":
    main()
