"""What goes into the chat model's residual stream: the patching conditions.

Every condition maps ``(h_base, h_chat, f, template)`` at one position to a residual
(docs/method.md 6), in model space: crosscoder decoder vectors are divided by the
per-model input scale, so ``f_j d_j^m / s_m`` is latent j's part of model m's
reconstruction as the model sees it. With ``delta_j = d_j^chat / s_chat - d_j^base / s_base``:

* ``None``        h_base
* ``All``         h_base + sum_j f_j delta_j            (decoder-bias difference left out, as the paper)
* ``eps_chat``    h_chat - sum_j f_j delta_j            (chat error + base reconstruction, up to biases)
* ``template``    h_chat at chat-template positions, h_base elsewhere
* set S, replace  h_base + sum_{j in S} f_j delta_j
* set S, add      h_base + sum_{j in S} f_j d_j^chat / s_chat

Tokens the crosscoder's training left out (its recorded token filter: first positions
holding massive activations, norm outliers; crossdiff.cache.store.ReadFilters) get f = 0: the
crosscoder never learnt to encode them, so every condition keeps h_base there (eps_chat
keeps h_chat).

Latent sets follow the paper: the candidate pool is the chat-only latents (dnorm above the
chat-only threshold), live, with both nu in [-0.1, 2]; its best and worst half by Latent
Scaling rank (rank(nu_recon) + rank(nu_error), low = chat-specific), its top and bottom
half by dnorm, and random halves of it. A crosscoder with fewer chat-only latents than
``pool_size`` (BatchTopK on a small fine-tune may have none) gets the ``pool_size`` most
chat-leaning latents instead, and the result says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from crossdiff.cache.store import ReadFilters, recorded_filter
from crossdiff.crosscoder import CrossCoder
from crossdiff.errors import CrossdiffError, first_line

NU_RANGE = (-0.1, 2.0)  # the paper keeps latents whose nu are in this range before ranking


@dataclass
class LatentSet:
    """A named set of latents patched together; ``group`` joins random draws into one row."""

    name: str
    latents: np.ndarray
    group: str = ""

    def __post_init__(self) -> None:
        self.latents = np.asarray(self.latents, dtype=np.int64)
        self.group = self.group or self.name


@dataclass
class Pool:
    """The candidate latents the paper's halves are drawn from, and how they were chosen."""

    latents: np.ndarray
    rule: str
    """'chat-only' (dnorm above the threshold) or 'top-dnorm' (fallback: too few chat-only latents)."""
    note: str
    n_chat_only: int
    info: dict = field(default_factory=dict)


def candidate_pool(table: pd.DataFrame, *, pool_size: int = 100, chat_only_threshold: float = 0.9) -> Pool:
    """Live latents with both nu in NU_RANGE: the chat-only ones, or the pool_size most chat-leaning."""
    if pool_size < 2:
        raise CrossdiffError(f"pool size must be at least 2 (two halves), got {pool_size}")
    lo, hi = NU_RANGE
    usable = table[~table["dead"].astype(bool) & table["nu_error"].between(lo, hi) & table["nu_recon"].between(lo, hi)]
    usable = usable.sort_values("dnorm", ascending=False, kind="stable")
    chat_only = usable[usable["dnorm"] > chat_only_threshold]
    n_chat_only = int((table["dnorm"] > chat_only_threshold).sum())
    if len(chat_only) >= pool_size:
        return Pool(chat_only["latent"].to_numpy(), "chat-only",
                    f"pool: {len(chat_only)} chat-only latents (dnorm > {chat_only_threshold}, live, nu in [{lo}, {hi}])", n_chat_only)
    pool = usable.head(pool_size)
    if len(pool) < 2:
        return Pool(pool["latent"].to_numpy(), "none", "pool: fewer than 2 live latents with both nu in "
                    f"[{lo}, {hi}]; no latent halves to compare (baselines only)", n_chat_only)
    note = (f"pool: only {n_chat_only} latents have dnorm > {chat_only_threshold} ({len(chat_only)} usable), fewer than "
            f"--pool-size {pool_size}; using the {len(pool)} most chat-leaning live latents instead "
            f"(dnorm {pool['dnorm'].min():.3f}..{pool['dnorm'].max():.3f})")
    return Pool(pool["latent"].to_numpy(), "top-dnorm", note, n_chat_only)


def paper_sets(table: pd.DataFrame, pool: Pool, *, random_seeds: int = 3) -> list[LatentSet]:
    """Best/worst half by Latent Scaling rank, top/bottom half by dnorm, random halves."""
    if len(pool.latents) < 2:
        return []
    rows = table.set_index("latent").loc[pool.latents]
    half = len(rows) // 2
    rank = rows["nu_recon"].rank() + rows["nu_error"].rank()  # low = chat-specific (the reference's rank_sum)
    by_rank = rank.sort_values(kind="stable").index.to_numpy()
    by_dnorm = rows["dnorm"].sort_values(ascending=False, kind="stable").index.to_numpy()
    sets = [
        LatentSet("ls-best", by_rank[:half]),
        LatentSet("ls-worst", by_rank[-half:]),
        LatentSet("dnorm-top", by_dnorm[:half]),
        LatentSet("dnorm-bottom", by_dnorm[-half:]),
    ]
    for seed in range(random_seeds):
        draw = np.random.default_rng(seed).permutation(pool.latents)[:half]
        sets.append(LatentSet(f"random-{seed}", np.sort(draw), group="random"))
    return sets


def user_set(table: pd.DataFrame, spec: str, n_latents: int, name: str | None = None) -> LatentSet:
    """Latents given as ids (``"3,17,42"``) or as a pandas query on the latent table."""
    spec = spec.strip()
    label = name or f"user: {spec if len(spec) <= 40 else spec[:37] + '...'}"
    if spec and all(part.strip().lstrip("-").isdigit() for part in spec.split(",")):
        ids = np.array([int(part) for part in spec.split(",")], dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= n_latents)]
        if len(bad):
            raise CrossdiffError(f"latent {int(bad[0])} out of range: the crosscoder has {n_latents} latents (0..{n_latents - 1})")
        return LatentSet(label, np.unique(ids))
    try:
        selected = table.query(spec)
    except Exception as err:  # pandas raises many types for a bad expression
        raise CrossdiffError(f"bad latent query {spec!r}: {first_line(err)}") from None
    if selected.empty:
        raise CrossdiffError(f"latent query {spec!r} selects no latents")
    return LatentSet(label, selected["latent"].to_numpy())


Condition = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


class Conditions:
    """The residual of every condition from one batch's base/chat residuals ([N, d], float32)."""

    def __init__(self, crosscoder: CrossCoder, sets: list[LatentSet], *, bos_token_id: int | None = None,
                 special_token_ids: list[int] = ()):
        self.crosscoder = crosscoder
        self.token_filter: ReadFilters | None = recorded_filter(crosscoder.config.metadata)
        if self.token_filter is not None and not self.token_filter.resolved:
            raise CrossdiffError("the crosscoder's token filter has no norm limits (it was never resolved on a cache); "
                                 "the causal experiment cannot apply it")
        self.bos_token_id, self.special_token_ids = bos_token_id, list(special_token_ids)
        scale = crosscoder.input_scale.float()
        W = crosscoder.W_dec.detach().float()  # [D, 2, d]
        self.chat_dec = W[:, 1] / scale[1]
        self.delta = self.chat_dec - W[:, 0] / scale[0]
        self.sets = sets
        self.index = {s.name: torch.tensor(s.latents, device=W.device) for s in sets}

    def encode(self, base: Tensor, chat: Tensor, positions: Tensor | None = None, token_ids: Tensor | None = None) -> Tensor:
        """Raw latent activations f [N, D] of the joint residuals; 0 on the tokens the
        crosscoder's token filter leaves out (needs each token's position and id)."""
        x = torch.stack([base, chat], dim=1).to(self.crosscoder.W_enc.dtype)
        f = self.crosscoder.encode(self.crosscoder.normalize(x)).float()
        if self.token_filter is not None and positions is not None:
            norms = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64).float().cpu().numpy()
            keep = self.token_filter.keep(positions.cpu().numpy(), token_ids.cpu().numpy(), norms,
                                          self.bos_token_id, self.special_token_ids)
            f = f * torch.from_numpy(keep).to(f.device, f.dtype)[:, None]
        return f

    def names(self) -> list[tuple[str, str | None, str, int]]:
        """``(condition key, form, row label, n_latents)`` in evaluation order."""
        D = self.crosscoder.config.d_sae
        out = [("None", None, "None", 0), ("All", None, "All", D), ("eps_chat", None, "eps_chat", D), ("template", None, "template", 0)]
        for s in self.sets:
            for form in ("replace", "add"):
                out.append((f"{s.name}|{form}", form, s.group, len(s.latents)))
        return out

    def residual(self, key: str, base: Tensor, chat: Tensor, f: Tensor, template: Tensor) -> Tensor:
        if key == "None":
            return base
        if key == "All":
            return base + f @ self.delta
        if key == "eps_chat":
            return chat - f @ self.delta
        if key == "template":
            return torch.where(template[:, None], chat, base)
        name, form = key.split("|")
        idx = self.index[name]
        directions = (self.delta if form == "replace" else self.chat_dec)[idx]
        return base + f[:, idx] @ directions
