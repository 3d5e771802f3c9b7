"""The options of `crossdiff explain` (ExplainConfig, with SampleConfig as its [samples] table):
free of torch and pandas, so that `crossdiff explain --help` builds its flags fast."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SampleConfig:
    n_explain: int = 10
    n_score_activating: int = 4
    n_score_similar: int = 2
    n_score_random: int = 2
    before: int = 12
    """Tokens shown before an excerpt's focus token."""
    after: int = 4
    n_top_tokens: int = 5
    mark_fraction: float = 0.5
    """Mark tokens at or above this fraction of the excerpt's largest activation."""


@dataclass
class ExplainConfig:
    latents: list[int] | None = None
    """Explain exactly these (default: confirmed chat-only, then most chat-leaning)."""
    max_latents: int = 20
    max_tokens: int = 300_000
    """Budget: estimated prompt + completion tokens of all requests together."""
    explain_max_tokens: int = 48
    detection_batch: int = 0
    """Excerpts per detection request (0: the whole held-out batch at once; 1 suits small models)."""
    top_logprobs: int = 5
    seed: int = 0
    samples: SampleConfig = field(default_factory=SampleConfig)
