"""Decoder and encoder geometry of every latent: relative norm, tag, cosines (docs/method.md 4).

Orientation, stated once and used everywhere in crossdiff: ``dnorm`` is 1 for a latent
that exists only in the chat model, 0 for one only in the base model, 0.5 for equal
norms. (The reference code stores ``1 - dnorm``.)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from crossdiff.analysis.config import TagThresholds
from crossdiff.crosscoder import CrossCoder, relative_norm

TAGS = ("chat-only", "base-only", "shared", "other")


class DecoderGeometry(NamedTuple):
    norm_base: np.ndarray
    """||W_dec[j, base]||."""
    norm_chat: np.ndarray
    """||W_dec[j, chat]||."""
    dnorm: np.ndarray
    """Relative decoder norm, 1 = chat-only, 0 = base-only."""
    dec_cos: np.ndarray
    """Cosine between the base and chat decoder vectors (NaN if either is zero)."""
    enc_cos: np.ndarray
    """Cosine between the base and chat encoder vectors (NaN if either is zero)."""


@torch.no_grad()
def decoder_geometry(crosscoder: CrossCoder, *, base: int = 0, chat: int = 1) -> DecoderGeometry:
    W_dec = crosscoder.W_dec.detach().to(torch.float64)
    W_enc = crosscoder.W_enc.detach().to(torch.float64)
    norms = W_dec.norm(dim=-1)
    nb, nc = norms[:, base], norms[:, chat]
    dnorm = relative_norm(nb, nc)
    return DecoderGeometry(
        norm_base=nb.cpu().numpy(),
        norm_chat=nc.cpu().numpy(),
        dnorm=dnorm.cpu().numpy(),
        dec_cos=_cosine(W_dec[:, base], W_dec[:, chat]),
        enc_cos=_cosine(W_enc[base].T, W_enc[chat].T),
    )


def tag_latents(dnorm: np.ndarray, thresholds: TagThresholds | None = None) -> np.ndarray:
    """One of TAGS per latent (object array of str)."""
    t = thresholds or TagThresholds()
    tags = np.full(dnorm.shape, "other", dtype=object)
    with np.errstate(invalid="ignore"):
        tags[(dnorm >= t.shared_low) & (dnorm <= t.shared_high)] = "shared"
        tags[dnorm > t.chat_only] = "chat-only"
        tags[dnorm < t.base_only] = "base-only"
    return tags


def _cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    denom = a.norm(dim=-1) * b.norm(dim=-1)
    cos = (a * b).sum(-1) / denom
    return torch.where(denom > 0, cos, torch.nan).cpu().numpy()
