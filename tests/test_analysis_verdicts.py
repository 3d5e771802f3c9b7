"""Verdicts a researcher can trust: the guards (too few tokens, out-of-range ratios) and the
jackknife uncertainty of every ratio, on planted data whose true ratio is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crossdiff.analysis.scaling import LatentScaling, ScalingThresholds
from crossdiff.analysis.verdicts import VERDICTS, verdicts

pytestmark = pytest.mark.usefixtures("one_thread")


def planted_scaling(n_latents: int, tokens_per_latent: int, base_strength, *, d_in: int = 16, noise: float = 1.0,
                    min_tokens: int = 1, seed: int = 0, counts=None):
    """Latent Scaling on planted data: every token has exactly one active latent j, with code
    f ~ U(0.5, 1.5) and activations x_base = a_j f d_j + noise, x_chat = f d_j + noise along a
    random unit chat decoder d_j (base decoder zero, x_hat = f W_dec). The true nu_error of
    latent j is a_j; its error target has noise of known size."""
    g = torch.Generator().manual_seed(seed)
    a = torch.as_tensor(base_strength, dtype=torch.float64).expand(n_latents)
    counts = counts if counts is not None else [tokens_per_latent] * n_latents
    latent = torch.cat([torch.full((c,), j) for j, c in enumerate(counts)])
    latent = latent[torch.randperm(len(latent), generator=g)]
    n = len(latent)
    W_dec = torch.zeros(n_latents, 2, d_in, dtype=torch.float64)
    W_dec[:, 1] = torch.nn.functional.normalize(torch.randn(n_latents, d_in, generator=g, dtype=torch.float64), dim=-1)
    f = torch.zeros(n, n_latents, dtype=torch.float64)
    code = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    f[torch.arange(n), latent] = code
    d = W_dec[latent, 1]
    x = torch.stack([a[latent, None] * code[:, None] * d, code[:, None] * d], dim=1)
    x = x + noise * torch.randn(x.shape, generator=g, dtype=torch.float64)
    x_hat = torch.einsum("bj,jmd->bmd", f, W_dec)
    scaler = LatentScaling(W_dec)
    for rows in torch.arange(n).split(997):
        scaler.update(f[rows], x[rows], x_hat[rows])
    return scaler.result()


def test_uncertainty_shrinks_with_tokens_and_covers_the_planted_ratio():
    truth = 0.3
    small = planted_scaling(200, 50, truth, seed=1)
    large = planted_scaling(200, 200, truth, seed=2)
    # Four times the tokens: half the standard error (1 / sqrt(n)).
    ratio = np.median(large.nu_error_se) / np.median(small.nu_error_se)
    assert 0.4 < ratio < 0.6, ratio
    for result in (small, large):
        assert np.isfinite(result.nu_error_se).all()
        covered = np.abs(result.nu_error - truth) <= 1.96 * result.nu_error_se
        # Nominal 95%; a 20-block jackknife is a little narrow (t with 19 degrees of freedom: 93.6%).
        assert 0.88 <= covered.mean() <= 0.99, covered.mean()
        # The planted reconstruction ratio is exactly 0 (base decoder zero): no spread at all.
        np.testing.assert_allclose(result.nu_recon, 0.0, atol=1e-12)


def test_one_token_gets_no_verdict_and_a_negative_ratio_is_flagged():
    # Latent 0: 1 token; 1: base anti-aligned (nu_error = -0.8); 2: chat-specific; 3: base has it.
    strengths = torch.tensor([0.0, -0.8, 0.0, 0.9], dtype=torch.float64)
    result = planted_scaling(4, 0, strengths, counts=[1, 400, 400, 400], noise=0.05, seed=3)
    assert result.n_tokens.tolist() == [1, 400, 400, 400]
    dead = np.zeros(4, dtype=bool)
    got = verdicts(result, dead, ScalingThresholds())
    assert list(got) == ["too few tokens", "out of range", "chat-specific", "complete shrinkage"]
    # The paper's rule alone would call the 1-token and the anti-aligned latent chat-specific.
    assert result.nu_error[1] < 0 and result.nu_recon[1] < 0.5
    assert set(got) <= set(VERDICTS)


def test_a_ratio_near_its_threshold_is_uncertain():
    # True nu_error at the threshold (0.2), noisy: the interval contains the threshold.
    result = planted_scaling(50, 100, 0.2, seed=4)
    got = verdicts(result, np.zeros(50, dtype=bool), ScalingThresholds())
    interval_contains = np.abs(result.nu_error - 0.2) <= 2 * result.nu_error_se
    assert (got[interval_contains] == "uncertain").all()
    assert interval_contains.mean() > 0.8
    assert set(got[~interval_contains]) <= {"chat-specific", "complete shrinkage"}
