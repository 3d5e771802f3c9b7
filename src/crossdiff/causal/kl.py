"""KL(p_chat || p_patched) per scored token, and token-weighted means with 95% intervals.

Tokens of one conversation are not independent, so the interval treats conversations as
clusters: the token-weighted mean is a ratio sum(KL) / sum(n) over conversations, and its
standard error is the usual ratio (delta-method) estimate over conversation totals,
se^2 = C / (C - 1) * sum_c (S_c - mean * n_c)^2 / N^2. The interval is mean +- 1.96 se.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch import Tensor

Z_95 = 1.959963984540054


def kl_per_token(logp_chat: Tensor, logits: Tensor, p_chat: Tensor | None = None) -> Tensor:
    """KL(p_chat || p) in float32 for rows of log-probabilities [N, V] and logits [N, V]
    (``p_chat`` = ``logp_chat.exp()``, when the caller already has it)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return ((logp_chat.exp() if p_chat is None else p_chat) * (logp_chat - logp)).sum(dim=-1)


def weighted_mean_ci(sums: np.ndarray, counts: np.ndarray) -> tuple[float, float, float]:
    """Token-weighted mean of per-conversation KL sums and its cluster 95% interval."""
    sums, counts = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    keep = counts > 0
    sums, counts = sums[keep], counts[keep]
    total = counts.sum()
    if total == 0:
        return math.nan, math.nan, math.nan
    mean = sums.sum() / total
    clusters = len(counts)
    if clusters < 2:
        return float(mean), math.nan, math.nan
    se = math.sqrt(clusters / (clusters - 1) * np.square(sums - mean * counts).sum()) / total
    return float(mean), float(mean - Z_95 * se), float(mean + Z_95 * se)


class KLAccumulator:
    """Per-conversation KL sums and token counts for every (condition, subset)."""

    def __init__(self) -> None:
        self.sums: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
        self.counts: dict[str, dict[int, int]] = defaultdict(dict)

    def add(self, condition: str, subset: str, conversation: int, kl_sum: float) -> None:
        """Add the summed KL of one conversation's scored tokens in ``subset``."""
        self.sums[condition, subset][conversation] = self.sums[condition, subset].get(conversation, 0.0) + float(kl_sum)

    def add_counts(self, subset: str, conversation: int, n: int) -> None:
        """Count one conversation's scored tokens in ``subset`` (once, whatever the conditions)."""
        self.counts[subset][conversation] = self.counts[subset].get(conversation, 0) + int(n)

    def state(self) -> dict[str, Any]:
        """Everything, as JSON-ready data (floats round-trip exactly through JSON)."""
        return {"sums": [[cond, subset, [[c, v] for c, v in values.items()]] for (cond, subset), values in self.sums.items()],
                "counts": [[subset, [[c, n] for c, n in values.items()]] for subset, values in self.counts.items()]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "KLAccumulator":
        accumulator = cls()
        for cond, subset, values in state["sums"]:
            accumulator.sums[cond, subset] = {int(c): float(v) for c, v in values}
        for subset, values in state["counts"]:
            accumulator.counts[subset] = {int(c): int(n) for c, n in values}
        return accumulator

    def result(self, conditions: list[str], subset: str) -> tuple[float, float, float, int]:
        """Mean, CI and tokens for conditions averaged per conversation (random draws share tokens)."""
        conversations = sorted(self.counts[subset])
        counts = np.array([self.counts[subset][c] for c in conversations])
        sums = np.mean([[self.sums[cond, subset].get(c, 0.0) for c in conversations] for cond in conditions], axis=0)
        mean, low, high = weighted_mean_ci(sums, counts)
        return mean, low, high, int(counts.sum())
