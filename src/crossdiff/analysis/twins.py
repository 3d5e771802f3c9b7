"""Twin search: base-only latents that point where a chat-only latent points.

Latent Decoupling (docs/method.md 5) leaves a concept that both models share split over two
latents: a chat-only one and a base-only "twin" that reconstructs it in the base model.
The paper's evidence is a base-only latent whose base decoder vector has a high cosine
with the chat-only latent's chat decoder vector; this module finds all such pairs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from crossdiff.analysis.config import DEFAULT_TWIN_COSINE
from crossdiff.crosscoder import CrossCoder

TWIN_COLUMNS = ["chat_latent", "base_latent", "cosine"]


@torch.no_grad()
def find_twins(
    crosscoder: CrossCoder,
    chat_only: np.ndarray,
    base_only: np.ndarray,
    *,
    min_cosine: float = DEFAULT_TWIN_COSINE,
    base: int = 0,
    chat: int = 1,
    block: int = 4096,
) -> pd.DataFrame:
    """All (chat-only, base-only) pairs with cos(W_dec[c, chat], W_dec[b, base]) > min_cosine.

    ``chat_only`` and ``base_only`` are boolean masks over latents. Returns a DataFrame
    with TWIN_COLUMNS, sorted by chat latent then decreasing cosine.
    """
    chat_idx = torch.as_tensor(np.nonzero(chat_only)[0], device=crosscoder.W_dec.device)
    base_idx = torch.as_tensor(np.nonzero(base_only)[0], device=crosscoder.W_dec.device)
    pairs = []
    if len(chat_idx) and len(base_idx):
        base_dirs = _unit(crosscoder.W_dec[base_idx, base].to(torch.float64))
        for start in range(0, len(chat_idx), block):  # blocks keep the cosine matrix small
            rows = chat_idx[start:start + block]
            cos = _unit(crosscoder.W_dec[rows, chat].to(torch.float64)) @ base_dirs.T
            r, c = torch.nonzero(cos > min_cosine, as_tuple=True)
            pairs.append(torch.stack([rows[r].double(), base_idx[c].double(), cos[r, c]], dim=1).cpu())
    table = torch.cat(pairs).numpy() if pairs else np.zeros((0, 3))
    frame = pd.DataFrame({
        "chat_latent": table[:, 0].astype(np.int64),
        "base_latent": table[:, 1].astype(np.int64),
        "cosine": table[:, 2],
    })
    return frame.sort_values(["chat_latent", "cosine"], ascending=[True, False], ignore_index=True)


def best_twin(twins: pd.DataFrame, n_latents: int) -> tuple[np.ndarray, np.ndarray]:
    """Per latent: index of its best twin (-1 if none) and that cosine (NaN if none)."""
    twin = np.full(n_latents, -1, dtype=np.int64)
    cosine = np.full(n_latents, np.nan)
    best = twins.drop_duplicates("chat_latent", keep="first")  # sorted by decreasing cosine
    twin[best["chat_latent"].to_numpy()] = best["base_latent"].to_numpy()
    cosine[best["chat_latent"].to_numpy()] = best["cosine"].to_numpy()
    return twin, cosine


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)
