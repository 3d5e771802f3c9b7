"""Per-latent activation statistics, and the crosscoder's overall reconstruction quality.

Every statistic uses the *scaled* activation f~ = f * (||d_base|| + ||d_chat||)
(docs/method.md 2): frequencies and maxima are comparable across latents whatever their
decoder norms. A latent counts as active on a token when f~ > ``active_threshold``
(1e-3, docs/method.md 4).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

ACTIVE_THRESHOLD = 1e-3


class LatentStats(NamedTuple):
    n_active: np.ndarray
    """Tokens on which the latent is active (int64)."""
    freq: np.ndarray
    """n_active / tokens analysed."""
    max_act: np.ndarray
    """Largest scaled activation f~ (0 for a latent that never fired)."""
    freq_per_source: dict[str, np.ndarray]
    max_act_per_source: dict[str, np.ndarray]
    dead: np.ndarray
    """Never active on the analysed tokens."""
    template_share: np.ndarray
    """Fraction of the non-BOS activations that fall on chat-template tokens (NaN if none)."""
    bos_share: np.ndarray
    """Fraction of the activations that fall on position 0, the BOS token (NaN if none)."""
    n_tokens: int
    n_tokens_per_source: dict[str, int]


class ActivationStats:
    """Streaming counts and maxima per latent, overall and per text source."""

    def __init__(self, n_latents: int, sources: list[str], *, device: torch.device | str = "cpu",
                 active_threshold: float = ACTIVE_THRESHOLD):
        self.sources = list(sources)
        self.threshold = active_threshold
        n_sources = len(self.sources)
        # Column layout of `counts`: one per source, then template (non-BOS), then BOS.
        self.counts = torch.zeros(n_latents, n_sources + 2, dtype=torch.int64, device=device)
        self.max_per_source = torch.zeros(n_latents, n_sources, dtype=torch.float64, device=device)
        self.tokens_per_source = torch.zeros(n_sources, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, f_scaled: Tensor, source_ids: Tensor, positions: Tensor, template: Tensor) -> None:
        n_sources = len(self.sources)
        active = (f_scaled > self.threshold).to(f_scaled.dtype)  # [B, D]
        is_bos = positions == 0
        # One matrix product counts activations per source, on template tokens and on BOS.
        groups = torch.cat(
            [
                torch.nn.functional.one_hot(source_ids.long(), n_sources),
                (template.bool() & ~is_bos)[:, None],
                is_bos[:, None],
            ],
            dim=1,
        ).to(f_scaled.dtype)  # [B, n_sources + 2]
        self.counts += (active.T @ groups).round().to(torch.int64)
        self.tokens_per_source += torch.bincount(source_ids.long(), minlength=n_sources)
        for s in range(n_sources):
            rows = source_ids == s
            if rows.any():
                batch_max = f_scaled[rows].max(dim=0).values.to(torch.float64)
                self.max_per_source[:, s] = torch.maximum(self.max_per_source[:, s], batch_max)

    def result(self) -> LatentStats:
        n_sources = len(self.sources)
        counts = self.counts.cpu().numpy()
        per_source = counts[:, :n_sources]
        n_active = per_source.sum(axis=1)
        template, bos = counts[:, n_sources], counts[:, n_sources + 1]
        tokens = self.tokens_per_source.cpu().numpy()
        maxima = self.max_per_source.cpu().numpy()
        n_tokens = int(tokens.sum())
        with np.errstate(divide="ignore", invalid="ignore"):
            freq = n_active / n_tokens if n_tokens else np.full(n_active.shape, np.nan)
            template_share = np.where(n_active - bos > 0, template / (n_active - bos), np.nan)
            bos_share = np.where(n_active > 0, bos / n_active, np.nan)
            freq_per_source = {
                name: (per_source[:, s] / tokens[s]) if tokens[s] else np.full(n_active.shape, np.nan)
                for s, name in enumerate(self.sources)
            }
        return LatentStats(
            n_active=n_active,
            freq=freq,
            max_act=maxima.max(axis=1) if n_sources else np.zeros(len(n_active)),
            freq_per_source=freq_per_source,
            max_act_per_source={name: maxima[:, s] for s, name in enumerate(self.sources)},
            dead=n_active == 0,
            template_share=template_share,
            bos_share=bos_share,
            n_tokens=n_tokens,
            n_tokens_per_source={name: int(tokens[s]) for s, name in enumerate(self.sources)},
        )


class ReconstructionQuality:
    """Fraction of variance explained per model and jointly, and the mean L0.

    FVE_m = 1 - sum ||h_m - x_hat_m||^2 / sum ||h_m - mean(h_m)||^2, in crosscoder space;
    the variance comes from float64 running sums, so one pass suffices.
    """

    def __init__(self, n_models: int = 2, d_in: int = 0, device: torch.device | str = "cpu"):
        self.sq_error = torch.zeros(n_models, dtype=torch.float64, device=device)
        self.sum_x = torch.zeros(n_models, d_in, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(n_models, dtype=torch.float64, device=device)
        self.active = torch.zeros((), dtype=torch.float64, device=device)
        self.n = 0

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, f: Tensor) -> None:
        x64 = x.to(torch.float64)
        self.sq_error += (x64 - x_hat.to(torch.float64)).square().sum(dim=(0, 2))
        self.sum_x += x64.sum(dim=0)
        self.sum_sq += x64.square().sum(dim=(0, 2))
        self.active += (f > 0).sum()
        self.n += x.shape[0]

    def result(self) -> dict[str, float]:
        if self.n == 0:
            return {"fve_base": float("nan"), "fve_chat": float("nan"), "fve": float("nan"), "l0": float("nan")}
        variance = self.sum_sq - self.sum_x.square().sum(-1) / self.n  # per model, summed over dims
        fve = 1 - self.sq_error / variance
        joint = 1 - self.sq_error.sum() / variance.sum()
        return {
            "fve_base": float(fve[0]),
            "fve_chat": float(fve[1]),
            "fve": float(joint),
            "l0": float(self.active / self.n),
        }
