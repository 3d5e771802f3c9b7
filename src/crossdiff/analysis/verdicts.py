"""One verdict per latent from Latent Scaling, with the guards that make it trustworthy.

The paper's rule (docs/method.md 5) reads two ratios of a latent: nu_error (high: the
base model has the concept, Complete Shrinkage) and nu_recon (high: the crosscoder
reconstructs it in the base model through other latents, Latent Decoupling); the latent is
chat-specific when nu_error < 0.2 and nu_recon < 0.5. A ratio is a fit, and a fit can be
meaningless, so before reading it the verdict checks, in this order:

``dead``            the latent never fired on the analysed tokens;
``no estimate``     a ratio is undefined (zero decoder along the direction);
``too few tokens``  the fit rests on fewer than ``min_tokens`` tokens;
``out of range``    the denominator's beta is not positive, or a ratio lies outside
                    [-margin, 1 + margin] by more than z standard errors: the latent does
                    not behave as the method assumes (the ratio of two betas is no longer
                    a share of the chat model's amount; a large negative nu_recon, for
                    example, comes from a chat beta near zero or a base reconstruction
                    pointing against the latent);
``uncertain``       the interval nu +- z * se of a ratio contains its threshold and the
                    other ratio does not already settle the question.

Otherwise the verdict is ``chat-specific`` (``base-specific`` for the base direction),
``complete shrinkage``, ``latent decoupling`` or ``shrinkage+decoupling``. The verdicts
are disjoint, so their counts add up to the number of latents. For a latent that is not
chat-only by its decoder norms the last three read "the base model has this concept too
(by the error / reconstruction target)"; the paper's names describe what that means for a
chat-only latent.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from crossdiff.analysis.scaling import LatentScalingResult, ScalingThresholds

DECISIONS = ("complete shrinkage", "latent decoupling", "shrinkage+decoupling")
GUARDS = ("uncertain", "out of range", "too few tokens", "no estimate", "dead")
VERDICTS = ("chat-specific", *DECISIONS, *GUARDS)
BASE_VERDICTS = ("base-specific", *DECISIONS, *GUARDS)

MEANINGS = {
    "chat-specific": "both ratios clearly below their thresholds: the base model has neither this concept nor an "
                     "equivalent of it; the chat model's own",
    "complete shrinkage": "nu_error high: the base model's activations contain the concept; the crosscoder's sparsity "
                          "shrank the latent's base decoder (chat-only by dnorm, not in the base)",
    "latent decoupling": "nu_recon high: the crosscoder rebuilds the concept in the base model through other latents; "
                         "what the latent encodes exists in the base",
    "shrinkage+decoupling": "both ratios high: the base model has the concept, by either reading",
    "uncertain": "a ratio's interval (nu +- z se) contains its threshold: no decision either way",
    "out of range": "a ratio outside [-margin, 1 + margin] or a non-positive denominator: the latent does not behave "
                    "as Latent Scaling assumes, so its ratios say nothing",
    "too few tokens": "the fit rests on fewer than min_tokens active tokens",
    "no estimate": "a ratio is undefined (zero decoder along the direction)",
    "dead": "never fired on the analysed tokens",
    "base-specific": "(along the base decoder) both ratios clearly low: the chat model lost this concept",
}
"""One line per verdict, for the report and the terminal. For a latent that is not chat-only by
its decoder norms the decisions read the same way: the base model has this concept too."""


def verdicts(result: LatentScalingResult, dead: np.ndarray, thresholds: ScalingThresholds,
             *, direction: str = "chat") -> np.ndarray:
    """The verdict of every latent (object array of str), guards first. ``direction`` is the
    decoder Latent Scaling used ("chat": the paper's; "base": the mirrored question)."""
    t = thresholds
    specific = f"{direction}-specific"
    nu_e, nu_r = result.nu_error, result.nu_recon
    se_e = _se(result.nu_error_se, nu_e)
    se_r = _se(result.nu_recon_se, nu_r)
    # The denominators: the direction model's betas (chat for the chat direction).
    own_error, own_recon = ((result.beta_error_chat, result.beta_recon_chat) if direction == "chat"
                            else (result.beta_error_base, result.beta_recon_base))
    out = np.full(nu_e.shape, "", dtype=object)
    with np.errstate(invalid="ignore"):
        error_side = _side(nu_e, se_e, t.nu_error_max, t.z)
        recon_side = _side(nu_r, se_r, t.nu_recon_max, t.z)
        low, high = -t.ratio_margin, 1 + t.ratio_margin
        # Outside the range even allowing for the ratio's own uncertainty.
        out_of_range = ((own_error <= 0) | (own_recon <= 0)
                        | (nu_e + t.z * se_e < low) | (nu_e - t.z * se_e > high)
                        | (nu_r + t.z * se_r < low) | (nu_r - t.z * se_r > high))
    decided = {
        (-1, -1): specific,
        (1, -1): "complete shrinkage",
        (-1, 1): "latent decoupling",
        (1, 1): "shrinkage+decoupling",
        (1, 0): "complete shrinkage",  # the error ratio alone already rules out chat-specific
        (0, 1): "latent decoupling",
    }
    for (e, r), name in decided.items():
        out[(error_side == e) & (recon_side == r)] = name
    out[out == ""] = "uncertain"
    out[out_of_range] = "out of range"
    out[result.n_tokens < t.min_tokens] = "too few tokens"
    out[np.isnan(nu_e) | np.isnan(nu_r)] = "no estimate"
    out[dead] = "dead"
    return out


def rank_sum(table: pd.DataFrame, pool: np.ndarray, prefix: str = "") -> np.ndarray:
    """The paper's combined ranking: rank by nu_error plus rank by nu_recon (1 = lowest ratio)
    over the latents in ``pool``; NaN for the others. Low = most specific. Ratios are ranked
    clipped at 0: a negative ratio (the base model points against the latent) says "none of
    it in the base", as 0 does, and must not outrank a well-measured 0 by its noise."""
    out = np.full(len(table), np.nan)
    if pool.any():
        rows = table[pool]
        out[pool] = (rows[f"{prefix}nu_error"].clip(lower=0).rank(method="average").to_numpy()
                     + rows[f"{prefix}nu_recon"].clip(lower=0).rank(method="average").to_numpy())
    return out


def decided(verdict: np.ndarray) -> np.ndarray:
    """Latents whose verdict is a decision (passed every guard): the rank-sum's pool."""
    return np.isin(verdict, [v for v in VERDICTS + BASE_VERDICTS if v not in GUARDS])


def _se(se: np.ndarray | None, nu: np.ndarray) -> np.ndarray:
    return np.zeros_like(nu) if se is None else se


def _side(nu: np.ndarray, se: np.ndarray, threshold: float, z: float) -> np.ndarray:
    """-1: below the threshold, 1: at or above it, 0: its interval contains it (or no se)."""
    side = np.where(nu < threshold, -1, 1)
    unsure = np.isnan(se) | ((nu - z * se < threshold) & (nu + z * se >= threshold))
    return np.where(unsure, 0, side)
