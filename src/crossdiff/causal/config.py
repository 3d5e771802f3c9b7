"""The options of `crossdiff causal` (CausalConfig), `crossdiff steer` (SteerConfig) and
`crossdiff behaviour` (BehaviourConfig): torch-free, so that their --help builds flags fast."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from crossdiff.devices import DEFAULT_DEVICE
from crossdiff.errors import CrossdiffError

DEFAULT_FACTORS = (-0.5, 0.5, 1.0, 1.5)
"""Steering factors of `crossdiff steer` (x the latent's max activation)."""


@dataclass
class CausalConfig:
    """Options of `crossdiff causal` (flags of the same names)."""

    crosscoder: str
    analysis_dir: str
    out: str | None = None
    """Output folder; default: ``causal/`` beside the analysis folder (RUN/<name>/causal)."""
    conversations: str | None = None
    """Full conversations: jsonl/parquet file, folder, saved or hub dataset."""
    column: str = "messages"
    split: str = "train"
    prompts: str | None = None
    """User prompts (.txt one per line, or a jsonl/parquet column) the chat model answers first."""
    prompt_column: str = "prompt"
    max_new_tokens: int = 64
    limit: int | None = None
    """Use only the first conversations / prompts."""
    base: str | None = None
    """Base model; default: the one the crosscoder was trained on."""
    chat: str | None = None
    layer: int | None = None
    """Block whose output is patched; must be the crosscoder's (default: the crosscoder's)."""
    k_first: int = 10
    pool_size: int = 100
    random_seeds: int = 3
    latents: list[str] = field(default_factory=list)
    """Extra latent sets: ``"3,17,42"`` or a pandas query on the latent table."""
    compare: list[str] = field(default_factory=list)
    """Other causal folders (another crosscoder's results) drawn beside this one in kl.png."""
    batch_size: int = 8
    tokens_per_pass: int = 16384
    """Upper passes stack several conditions up to this many (padded) tokens."""
    max_len: int = 1024
    device: str = DEFAULT_DEVICE
    model_dtype: str = "float32"
    save_every_s: float = 30.0
    """Seconds between saves of the scored batches' sums (the resume point); 0 saves after every batch."""

    def __post_init__(self) -> None:
        if (self.conversations is None) == (self.prompts is None):
            raise CrossdiffError("give exactly one of --conversations (full conversations) or --prompts (answered by the chat model)")
        for name in ("k_first", "batch_size", "max_len", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise CrossdiffError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.random_seeds < 0 or (self.limit is not None and self.limit < 1):
            raise CrossdiffError("random_seeds must be >= 0 and limit >= 1")


STEER_HOW = ("direction", "activation")


@dataclass
class SteerConfig:
    crosscoder: str
    analysis_dir: str
    latents: list[str]
    """Latent sets, each ``"ID[,ID...]"`` steered together (or a pandas query on the latent table)."""
    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    factors: list[float] = field(default_factory=lambda: list(DEFAULT_FACTORS))
    model: str = "base"
    """Which model is steered and generates: base or chat."""
    positions: str = "all"
    """all (prompt and every generated token) or prompt (the prompt's positions only)."""
    max_new_tokens: int = 32
    out: str | None = None
    """steering.jsonl path; default: causal/steering.jsonl beside the analysis folder."""
    base: str | None = None
    chat: str | None = None
    layer: int | None = None
    device: str = DEFAULT_DEVICE
    model_dtype: str = "float32"
    expect: str | None = None
    """A regular expression: an answer that contains a match shows the behaviour (counted per set and factor)."""
    controls: int = 0
    """Sets of random live latents (as large as the largest chosen set) steered the same way, as a baseline for the counts."""
    seed: int = 0
    """Seed of the control latents' draw."""
    how: str = "direction"
    """direction: a constant vector (unit chat decoder directions x max activation) x factor; activation: each latent's own
    activation, read from both models run side by side, x its chat-minus-base decoder difference x factor (base only)."""

    def __post_init__(self) -> None:
        if self.model not in ("base", "chat"):
            raise CrossdiffError(f"--model must be base or chat, got {self.model!r}")
        if self.how not in STEER_HOW:
            raise CrossdiffError(f"--how must be one of {', '.join(STEER_HOW)}, got {self.how!r}")
        if self.how == "activation" and (self.model != "base" or self.positions != "all"):
            raise CrossdiffError("--how activation steers the base at every position (the chat model runs beside it): "
                                 "drop --model chat / --positions prompt")
        if self.positions not in ("all", "prompt"):
            raise CrossdiffError(f"--positions must be all or prompt, got {self.positions!r}")
        if not self.latents:
            raise CrossdiffError("give at least one --latent")
        if not self.factors:
            raise CrossdiffError("give at least one --factor")
        if self.max_new_tokens < 1:
            raise CrossdiffError("--max-new-tokens must be at least 1")
        if self.controls < 0:
            raise CrossdiffError("--controls must be 0 or more")
        if self.expect is not None:
            try:
                re.compile(self.expect)
            except re.error as error:
                raise CrossdiffError(f"--expect {self.expect!r} is not a regular expression: {error}") from None


@dataclass
class BehaviourConfig:
    """A recipe's ``[behaviour]`` table (flags of ``crossdiff behaviour``)."""

    prompts: str | None = None
    """Prompts (.txt one per line, or a jsonl/parquet/dataset column); default: the first user turns of the first chat source."""
    column: str = "prompt"
    group_column: str = "group"
    """Column naming each prompt's group (optional: prompts without it have no group)."""
    limit: int | None = 200
    """Use only the first prompts."""
    max_new_tokens: int = 64
    batch_size: int = 8
    device: str = DEFAULT_DEVICE
    model_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or (self.limit is not None and self.limit < 1):
            raise CrossdiffError("behaviour: max_new_tokens, batch_size and limit must be at least 1")
