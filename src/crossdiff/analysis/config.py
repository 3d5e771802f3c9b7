"""The options of `crossdiff analyze` (AnalysisConfig, with the paper's thresholds) and of
`crossdiff adl` (ADLConfig): torch-free, so that their --help builds flags without torch."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from crossdiff.devices import DEFAULT_DEVICE
from crossdiff.errors import CrossdiffError

DEFAULT_TWIN_COSINE = 0.5
ADL_FACTORS = (0.5, 1.0, 2.0)


@dataclass
class TagThresholds:
    """The paper's thresholds on dnorm (1 = chat-only)."""

    chat_only: float = 0.9
    """dnorm above this: chat-only."""
    base_only: float = 0.1
    """dnorm below this: base-only."""
    shared_low: float = 0.4
    shared_high: float = 0.6
    """dnorm within [shared_low, shared_high]: shared."""


@dataclass
class ScalingThresholds:
    """The paper's decision rule (docs/method.md 5)."""

    nu_error_max: float = 0.2
    """Chat-specific needs nu_error below this; at or above it a chat-only latent is flagged as Complete Shrinkage."""
    nu_recon_max: float = 0.5
    """Chat-specific needs nu_recon below this; at or above it a chat-only latent is flagged as Latent Decoupling."""
    min_tokens: int = 50
    """Guard: a verdict needs at least this many tokens with f > 0 (fewer: "too few tokens")."""
    ratio_margin: float = 0.25
    """Guard: a ratio outside [-ratio_margin, 1 + ratio_margin] by more than z standard errors, or a
    non-positive beta in the ratio's denominator, gets "out of range" instead of a verdict."""
    z: float = 2.0
    """Guard: a ratio whose interval nu +- z * se contains its threshold makes the verdict "uncertain"."""
    n_blocks: int = 20
    """Token blocks of the jackknife that gives every ratio its standard error (0: no uncertainty)."""

    def __post_init__(self) -> None:
        if self.min_tokens < 1 or self.ratio_margin < 0 or self.z < 0 or self.n_blocks in (1,) or self.n_blocks < 0:
            raise CrossdiffError("scaling: min_tokens must be >= 1, ratio_margin and z >= 0, n_blocks 0 or >= 2")


@dataclass
class AnalysisConfig:
    """Options of `crossdiff analyze` (a TOML/JSON file with these keys, flags override)."""

    batch_size: int = 4096
    max_tokens: int | None = None
    """Analyse only the first tokens of the cache (None = all)."""
    device: str = DEFAULT_DEVICE
    """`cpu`, `cuda`, `cuda:1`, `mps` or `auto` (CUDA if present)."""
    dtype: Literal["float32", "float64"] = "float32"
    """Compute dtype of the crosscoder and activations; sums are always float64."""
    tags: TagThresholds = field(default_factory=TagThresholds)
    scaling: ScalingThresholds = field(default_factory=ScalingThresholds)
    twin_cosine: float = DEFAULT_TWIN_COSINE
    """Minimum decoder cosine between a chat-only latent and its base-only twin."""
    examples: bool = True
    n_top: int = 20
    """Max-activating examples kept per latent."""
    quantile_bins: int = 10
    """Bins at fractions of each latent's max activation (0 disables quantile samples)."""
    per_bin: int = 2
    window_before: int = 32
    window_after: int = 8
    seed: int = 0
    allow_mismatch: bool = False
    """Analyse a cache collected at another layer or from other models than the crosscoder's."""
    n_findings: int = 20
    """Latents listed in each ranked list of the summary (top by dnorm, by rank-sum, chat-specific)."""
    token_filter: bool = True
    """Leave out the tokens the crosscoder's training left out (its recorded filter: massive
    activations, ...; docs/cache.md); false analyses every token."""

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise CrossdiffError(f"batch_size must be positive, got {self.batch_size}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise CrossdiffError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.n_top <= 0 or self.quantile_bins < 0 or self.per_bin <= 0:
            raise CrossdiffError("n_top and per_bin must be positive and quantile_bins non-negative")
        if self.window_before < 0 or self.window_after < 0:
            raise CrossdiffError("window_before and window_after must be non-negative")


@dataclass
class ADLConfig:
    base: str
    chat: str
    layer: int
    texts: str
    """Unrelated documents: a .txt file (one per line) or a jsonl/parquet file or dataset with a `text` column."""
    out: str
    positions: int = 5
    """k: the first k token positions (BOS included when the tokenizer adds one)."""
    max_docs: int = 1000
    top_tokens: int = 10
    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    steer_positions: list[int] | None = None
    """Positions whose differences are steered with; None = all but position 0."""
    factors: list[float] = field(default_factory=lambda: list(ADL_FACTORS))
    models: list[str] = field(default_factory=lambda: ["base", "chat"])
    expect: str | None = None
    controls: int = 0
    seed: int = 0
    max_new_tokens: int = 32
    device: str = DEFAULT_DEVICE
    model_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.positions < 1 or self.max_docs < 1 or self.top_tokens < 1 or self.max_new_tokens < 1 or self.controls < 0:
            raise CrossdiffError("--positions, --docs, --top and --max-new-tokens must be at least 1, --controls at least 0")
        if any(m not in ("base", "chat") for m in self.models):
            raise CrossdiffError(f"--model must be base or chat, got {self.models}")
        if self.steer_positions is not None and any(not 0 <= p < self.positions for p in self.steer_positions):
            raise CrossdiffError(f"--steer-position must be in 0..{self.positions - 1}, got {self.steer_positions}")
        if self.expect is not None:
            try:
                re.compile(self.expect)
            except re.error as error:
                raise CrossdiffError(f"--expect {self.expect!r} is not a regular expression: {error}") from None
