"""Latent Scaling for every latent in one streaming pass (docs/method.md 5).

For latent j with direction d_j = W_dec[j, chat] (used for both models) and a target
y(x), Latent Scaling fits one scalar over the tokens:

    beta_j = sum_x f_j(x) <d_j, y(x)> / ( ||d_j||^2 sum_x f_j(x)^2 )

The reference implementation materialises one (latents x tokens x d) tensor per error
target, because the leave-one-out error target differs for every latent. Expanding it
removes that need. With e_m = h_m - x_hat_m the model's reconstruction error,

    y_j(x) = e_m(x) + f_j(x) W_dec[j, m]                        (error, leave-one-out)
    sum_x f_j <d_j, y_j> = sum_x f_j <d_j, e_m>  +  <d_j, W_dec[j, m]> sum_x f_j^2

so every target needs only three per-latent sums, each a plain accumulation:

    N_target[j] = sum_x f_j(x) <d_j, t(x)>     for t in {e_base, e_chat, x_hat_base, x_hat_chat}
    S2[j]       = sum_x f_j(x)^2
    n[j]        = #{x : f_j(x) > 0}             (the tokens the fit rests on)

The activation target h_m = e_m + x_hat_m needs no sum of its own. Per batch the
projections <d_j, t(x)> are only needed where f_j(x) != 0; for sparse codes (BatchTopK)
they are computed exactly there with a sampled matrix product (SDDMM), for dense codes
(L1) as one [B, d] x [d, D] product per target. Sums are kept in float64.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

BASE, CHAT = 0, 1
# Column order of the numerator accumulator.
_TARGETS = ("error_base", "error_chat", "recon_base", "recon_chat")
# Below this fraction of nonzero codes the sampled (sparse) product beats the dense one.
_SPARSE_DENSITY = 0.05
_DENSE_CHUNK_ELEMENTS = 1 << 24


class LatentScalingResult(NamedTuple):
    """Per-latent Latent Scaling results, numpy float64 arrays of length d_sae (NaN where
    the latent never fired or its chat decoder vector is zero)."""

    beta_error_base: np.ndarray
    """Base error target, leave-one-out: y = h_base - x_hat_base + f_j W_dec[j, base]."""
    beta_error_chat: np.ndarray
    """Chat error target, leave-one-out: y = h_chat - x_hat_chat + f_j W_dec[j, chat] (about 1 for a good latent)."""
    beta_recon_base: np.ndarray
    """Base reconstruction target y = x_hat_base (all latents and bias)."""
    beta_recon_chat: np.ndarray
    """Chat reconstruction target y = x_hat_chat."""
    beta_act_base: np.ndarray
    """Base activation target y = h_base."""
    beta_act_chat: np.ndarray
    """Chat activation target y = h_chat."""
    nu_error: np.ndarray
    """beta_error_base / beta_error_chat: high means Complete Shrinkage."""
    nu_recon: np.ndarray
    """beta_recon_base / beta_recon_chat: high means Latent Decoupling."""
    n_tokens: np.ndarray
    """Number of tokens with f_j > 0, the tokens every beta of latent j rests on (int64)."""


class LatentScaling:
    """Accumulates the sums above batch by batch; :meth:`result` turns them into betas.

    ``W_dec`` is the crosscoder's decoder [d_sae, 2, d_in]; feed :meth:`update` with raw
    activations ``f`` (inference sparsity, BatchTopK threshold included), crosscoder-space
    inputs ``x`` and reconstructions ``x_hat`` (both [B, 2, d_in], bias included).
    """

    def __init__(self, W_dec: Tensor, *, base: int = BASE, chat: int = CHAT):
        self.W_dec = W_dec.detach()
        self.base, self.chat = base, chat
        n_latents = W_dec.shape[0]
        device = W_dec.device
        self.numerators = torch.zeros(n_latents, len(_TARGETS), dtype=torch.float64, device=device)
        self.sum_f2 = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.n_tokens = torch.zeros(n_latents, dtype=torch.int64, device=device)
        self._direction_cache: dict[tuple[torch.dtype, bool], Tensor] = {}

    @torch.no_grad()
    def update(self, f: Tensor, x: Tensor, x_hat: Tensor) -> None:
        base, chat = self.base, self.chat
        targets = [x[:, base] - x_hat[:, base], x[:, chat] - x_hat[:, chat], x_hat[:, base], x_hat[:, chat]]
        directions = self._directions(f.dtype)  # [D, d]
        nonzero = int(torch.count_nonzero(f))
        if nonzero == 0:
            return
        if nonzero < _SPARSE_DENSITY * f.numel():
            self._update_sparse(f, targets, directions)
        else:
            self._update_dense(f, torch.stack(targets, dim=1), directions)

    def _update_dense(self, f: Tensor, targets: Tensor, directions: Tensor) -> None:
        # Row chunks keep the [4, rows, D] projection tensor near _DENSE_CHUNK_ELEMENTS.
        rows = max(1, _DENSE_CHUNK_ELEMENTS // (targets.shape[1] * f.shape[1]))
        for start in range(0, f.shape[0], rows):
            chunk = slice(start, start + rows)
            projections = torch.einsum("btd,jd->tbj", targets[chunk], directions)  # [4, rows, D]
            self.numerators += (projections * f[chunk]).to(torch.float64).sum(dim=1).T
        self.sum_f2 += f.to(torch.float64).square().sum(dim=0)
        self.n_tokens += (f > 0).sum(dim=0)

    def _update_sparse(self, f: Tensor, targets: list[Tensor], directions: Tensor) -> None:
        with warnings.catch_warnings():  # "sparse CSR support is in beta"; the ops used here are stable
            warnings.simplefilter("ignore", UserWarning)
            codes = f.to_sparse_csr()
            latent_of_entry = codes.col_indices()
            values = codes.values()
            directions_t = self._directions(f.dtype, transposed=True)
            for t, target in enumerate(targets):
                # <t(x), d_j> only where f_j(x) != 0: a sampled dense-dense product (SDDMM).
                sampled = torch.sparse.sampled_addmm(codes, target.contiguous(), directions_t, beta=0.0)
                self.numerators[:, t].index_add_(0, latent_of_entry, (sampled.values() * values).to(torch.float64))
        self.sum_f2.index_add_(0, latent_of_entry, values.to(torch.float64).square())
        self.n_tokens.index_add_(0, latent_of_entry, (values > 0).long())

    def _directions(self, dtype: torch.dtype, transposed: bool = False) -> Tensor:
        """The chat decoder (or its transpose) in ``dtype``, made once: the weights are fixed."""
        key = (dtype, transposed)
        if key not in self._direction_cache:
            directions = self.W_dec[:, self.chat].to(dtype)
            self._direction_cache[key] = directions.T.contiguous() if transposed else directions.contiguous()
        return self._direction_cache[key]

    def result(self) -> LatentScalingResult:
        W = self.W_dec.to(torch.float64)
        d = W[:, self.chat]
        norm_d2 = d.square().sum(-1)
        # <d_j, W_dec[j, m]> S2_j: latent j's own contribution, added back for the leave-one-out targets.
        own_base = (d * W[:, self.base]).sum(-1) * self.sum_f2
        own_chat = norm_d2 * self.sum_f2
        num = self.numerators
        numerators = {
            "error_base": num[:, 0] + own_base,
            "error_chat": num[:, 1] + own_chat,
            "recon_base": num[:, 2],
            "recon_chat": num[:, 3],
            "act_base": num[:, 0] + num[:, 2],
            "act_chat": num[:, 1] + num[:, 3],
        }
        denominator = norm_d2 * self.sum_f2
        valid = (self.n_tokens > 0) & (denominator > 0)
        betas = {
            name: torch.where(valid, value / torch.where(valid, denominator, 1.0), math.nan).cpu().numpy()
            for name, value in numerators.items()
        }
        with np.errstate(divide="ignore", invalid="ignore"):
            nu_error = betas["error_base"] / betas["error_chat"]
            nu_recon = betas["recon_base"] / betas["recon_chat"]
        return LatentScalingResult(
            **{f"beta_{name}": value for name, value in betas.items()},
            nu_error=nu_error,
            nu_recon=nu_recon,
            n_tokens=self.n_tokens.cpu().numpy(),
        )


@dataclass
class ScalingThresholds:
    """The paper's decision rule (docs/method.md 5)."""

    nu_error_max: float = 0.2
    """Chat-specific needs nu_error below this; at or above it a chat-only latent is flagged as Complete Shrinkage."""
    nu_recon_max: float = 0.5
    """Chat-specific needs nu_recon below this; at or above it a chat-only latent is flagged as Latent Decoupling."""


class ScalingFlags(NamedTuple):
    chat_specific: np.ndarray
    """nu_error < nu_error_max and nu_recon < nu_recon_max (False where either is NaN)."""
    complete_shrinkage: np.ndarray
    """Chat-only by norm and nu_error >= nu_error_max."""
    latent_decoupling: np.ndarray
    """Chat-only by norm and nu_recon >= nu_recon_max."""


def scaling_flags(result: LatentScalingResult, chat_only: np.ndarray, thresholds: ScalingThresholds) -> ScalingFlags:
    """Flags of the paper; NaN ratios never raise a flag (comparisons with NaN are False)."""
    with np.errstate(invalid="ignore"):
        low_error = result.nu_error < thresholds.nu_error_max
        low_recon = result.nu_recon < thresholds.nu_recon_max
        high_error = result.nu_error >= thresholds.nu_error_max
        high_recon = result.nu_recon >= thresholds.nu_recon_max
    return ScalingFlags(
        chat_specific=low_error & low_recon,
        complete_shrinkage=chat_only & high_error,
        latent_decoupling=chat_only & high_recon,
    )
