"""Which cached tokens a reader leaves out (massive activations, BOS, special tokens): one
definition for training, streaming, analysis and the causal experiment (docs/cache.md).

numpy only, no torch: configs (train's DataConfig) build a filter without loading torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from crossdiff.cache.defaults import DEFAULT_MAX_NORM_RATIO, FIRST_POSITION
from crossdiff.config import from_dict
from crossdiff.errors import CrossdiffError

@dataclasses.dataclass
class ReadFilters:
    """Tokens to leave out at read time; the cache itself always keeps every token.

    The one definition of which tokens training, analysis and the causal experiment use
    (docs/cache.md, "Massive activations"). A filter is *resolved* on a cache (its norm
    profile): ``auto`` becomes ``drop`` or ``keep`` and the ratio becomes absolute limits,
    and the resolved filter is what a crosscoder records, so that analysis and the causal
    experiment leave out the same tokens on any cache without the user repeating it.
    """

    first_position: Literal["auto", "drop", "keep"] = "auto"
    """Position 0 of every document, whatever its id: ``drop``, ``keep``, or ``auto``: drop it
    when the median norm of position-0 tokens exceeds ``max_norm_ratio`` x the median norm."""
    max_norm_ratio: float | None = DEFAULT_MAX_NORM_RATIO
    """Drop tokens where either model's norm exceeds this multiple of that model's median norm."""
    drop_bos: bool = False
    """Drop the BOS token (position 0 holding the tokenizer's BOS id; position 0 if it has none)."""
    drop_special: bool = False
    """Drop tokens whose id is one of the tokenizer's special ids recorded at collection."""
    max_norm: list[float] | None = None
    """Per-model norm limits [base, chat] that ``max_norm_ratio`` resolved to (set by :meth:`resolve`)."""

    def __post_init__(self) -> None:
        if self.first_position not in FIRST_POSITION:
            raise CrossdiffError(f"first_position must be one of {list(FIRST_POSITION)}, got {self.first_position!r}")
        if self.max_norm_ratio is not None and not self.max_norm_ratio > 0:
            raise CrossdiffError(f"max_norm_ratio must be positive (or null for no norm limit), got {self.max_norm_ratio}")

    @property
    def resolved(self) -> bool:
        return self.first_position != "auto" and (self.max_norm_ratio is None or self.max_norm is not None)

    def resolve(self, profile: dict[str, Any]) -> ReadFilters:
        """This filter with ``auto`` decided and the ratio turned into limits, from a norm
        profile (:func:`norm_profile`: the median norm per model, overall and at position 0)."""
        if self.resolved:
            return self
        median = np.asarray(profile["median"], np.float64)
        first = self.first_position
        if first == "auto":
            massive = self.max_norm_ratio is not None and profile.get("first_position_median") is not None and bool(
                (np.asarray(profile["first_position_median"]) > self.max_norm_ratio * median).any())
            first = "drop" if massive else "keep"
        limits = None
        if self.max_norm_ratio is not None:
            # float32: the precision of the stored norms the limits are compared with.
            limits = [float(v) for v in (self.max_norm_ratio * median).astype(np.float32)]
        return dataclasses.replace(self, first_position=first, max_norm=limits)

    def reasons(self, positions: np.ndarray, token_ids: np.ndarray, norms: np.ndarray | None,
                bos_token_id: int | None = None, special_token_ids: Sequence[int] = ()) -> dict[str, np.ndarray]:
        """Why each token is left out: one boolean mask per reason, each token under its first
        reason only (``first_position``, ``bos``, ``special``, ``norm``). A resolved filter only.

        ``norms`` [n, 2] are the float32 norms of the stored activations (``tokens.npy``'s
        ``norm``); they may be None when the filter has no norm limit.
        """
        if not self.resolved:
            raise ValueError("resolve the filter on a cache (ReadFilters.resolve) before applying it")
        n = len(positions)
        taken = np.zeros(n, dtype=bool)
        out: dict[str, np.ndarray] = {}

        def add(name: str, mask: np.ndarray) -> None:
            nonlocal taken
            out[name] = mask & ~taken
            taken = taken | mask

        first = np.asarray(positions) == 0
        if self.first_position == "drop":
            add("first_position", first)
        if self.drop_bos:
            add("bos", first & (np.asarray(token_ids) == bos_token_id) if bos_token_id is not None else first)
        if self.drop_special and len(special_token_ids):
            add("special", np.isin(np.asarray(token_ids), np.asarray(special_token_ids)))
        if self.max_norm is not None:
            add("norm", ~(np.asarray(norms, np.float32) <= np.asarray(self.max_norm, np.float32)).all(axis=1))
        return out

    def keep(self, positions: np.ndarray, token_ids: np.ndarray, norms: np.ndarray | None,
             bos_token_id: int | None = None, special_token_ids: Sequence[int] = ()) -> np.ndarray:
        """Boolean mask: True for tokens to keep (see :meth:`reasons`)."""
        keep = np.ones(len(positions), dtype=bool)
        for mask in self.reasons(positions, token_ids, norms, bos_token_id, special_token_ids).values():
            keep &= ~mask
        return keep

    def keep_mask(self, tokens: np.ndarray, cache: Any) -> np.ndarray:
        """Boolean mask over a slice of ``tokens.npy`` records: True for tokens to keep."""
        f = self if self.resolved else self.resolve(cache.norm_profile())
        return f.keep(tokens["position"], tokens["token_id"], tokens["norm"], cache.manifest.get("bos_token_id"),
                      cache.special_token_ids)

    def describe(self) -> str:
        """The rule in words, for summaries ("first positions, above 10x the median norm")."""
        parts = []
        if self.first_position == "drop":
            parts.append("first positions")
        if self.drop_bos:
            parts.append("BOS")
        if self.drop_special:
            parts.append("special tokens")
        if self.max_norm_ratio is not None:
            parts.append(f"tokens above {self.max_norm_ratio:g}x the median norm")
        return ", ".join(parts) or "nothing"


def recorded_filter(metadata: dict[str, Any]) -> ReadFilters | None:
    """The token filter a crosscoder records (``config.metadata["token_filter"]``, written by
    training); None for crosscoders trained before crossdiff recorded one, or imported."""
    data = metadata.get("token_filter")
    return from_dict(ReadFilters, data, "token_filter") if data is not None else None
