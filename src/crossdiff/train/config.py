"""The options of `crossdiff train` (TrainConfig with its [data] table) and of `train --stream`
(StreamConfig): torch-free, so that `crossdiff train --help` builds its flags from them fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from crossdiff.cache.defaults import DEFAULT_MAX_NORM_RATIO
from crossdiff.devices import DEFAULT_DEVICE
from crossdiff.errors import CrossdiffError
from crossdiff.train.variants import check_variant

if TYPE_CHECKING:
    from crossdiff.cache.filters import ReadFilters

Reconstruction = Literal["l2", "squared"]


# Keys that may differ between a checkpoint and the run that resumes it.
RESUMABLE_CHANGES = {
    "steps", "log_every", "checkpoint_every", "keep_checkpoints", "device", "precision", "wandb_project", "wandb_run_name",
}


@dataclass
class DataConfig:
    """How `crossdiff train --cache` reads the activation cache (see docs/cache.md)."""

    source_ratio: dict[str, float] | None = None
    """Share of each source in every batch, e.g. {fineweb = 0.5, lmsys = 0.5}; None = all tokens."""
    epochs: int | None = 1
    """Passes over the cache; None = endless (then set `steps`)."""
    window_shards: int = 4
    """Shards shuffled together."""
    normalize: bool = True
    """Scale each model's activations so that E||x||^2 = d_model (over the kept tokens); stored as input_scale."""
    first_position: Literal["auto", "drop", "keep"] = "auto"
    """Leave out position 0 of every document: `auto` when it holds massive activations (docs/cache.md)."""
    max_norm_ratio: float | None = DEFAULT_MAX_NORM_RATIO
    """Leave out tokens above this multiple of the median norm (massive activations); null keeps them."""
    drop_bos: bool = False
    drop_special: bool = False

    def token_filter(self) -> ReadFilters:
        """The read-time filter these options describe (crossdiff.cache.filters.ReadFilters)."""
        from crossdiff.cache.filters import ReadFilters  # numpy: deferred so that `train --help` stays fast

        return ReadFilters(first_position=self.first_position, max_norm_ratio=self.max_norm_ratio,
                           drop_bos=self.drop_bos, drop_special=self.drop_special)


@dataclass
class TrainConfig:
    """Every training option; defaults are the paper's BatchTopK run (docs/method.md 3)."""

    activation: Literal["batchtopk", "relu", "topk"] = "batchtopk"
    """`batchtopk` (k*B latents per batch), `relu` (the L1 crosscoder) or per-token `topk`."""
    variant: Literal["standard", "dfc", "matryoshka", "delta"] = "standard"
    """`standard` (the paper), `dfc` (dedicated feature crosscoder), `matryoshka` (nested
    prefixes) or `delta` (Delta-Crosscoder); docs/method.md 8, crossdiff.train.variants."""
    dfc_fractions: list[float] | None = None
    """dfc only: [base-exclusive, chat-exclusive] shares of d_sae (rounded down); null = [0.05, 0.05]."""
    matryoshka_prefixes: list[float] | None = None
    """matryoshka only: increasing prefix sizes as shares of d_sae, the last 1; null = [0.0625, 0.25, 1]."""
    delta_weight: float | None = None
    """delta only: weight of the chat-minus-base difference term; null = 1."""
    d_sae: int | None = None
    """Dictionary size; None = expansion_factor * d_in."""
    expansion_factor: int = 32
    k: int = 100
    """Active latents per token (on average over the batch for batchtopk)."""
    l1_coefficient: float = 0.041
    """mu of the L1 crosscoder (relu only)."""
    reconstruction: Reconstruction = "l2"
    """`l2`: mean over tokens and models of ||x - x_hat|| (reference code); `squared`: of ||x - x_hat||^2."""
    auxk_alpha: float = 1 / 32
    """Weight of the dead-latent auxiliary loss (top-k activations)."""
    k_aux: int | None = None
    """Dead latents per token in the auxiliary loss; None = d_in // 2."""
    dead_after_tokens: int = 10_000_000
    """A latent that has not fired for this many tokens is dead."""
    threshold_beta: float = 0.999
    threshold_start_step: int = 1000
    """The threshold EMA runs on steps (0-based) after this one, as in the reference."""
    code_normalization: Literal["crosscoder", "sae", "mixed", "none"] = "crosscoder"
    norm_init_scale: float | None = None
    """Per-model decoder norm at init; None = 1.0 for top-k activations, 0.005 for relu."""
    decoder_bias_init: Literal["auto", "geometric_median", "zeros"] = "auto"
    """`auto`: geometric median of the first batch for top-k activations, zeros for relu (reference)."""
    lr: float = 1e-4
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 1000
    """Linear warm-up from 0 (the reference's step / warmup_steps), then constant."""
    decay_fraction: float = 0.0
    """Decay the learning rate linearly to 0 over this last fraction of `steps` (0 = no decay)."""
    max_grad_norm: float | None = None
    """Gradient-norm clip; None = 1.0 for top-k activations and none for relu (paper); 0 = off."""
    steps: int | None = None
    """Stop after this many steps; None = when the data ends."""
    batch_size: int = 2048
    """Tokens per step (used by the CLI's loader; library users choose their own batches)."""
    seed: int = 0
    sparse: bool | None = None
    """Sparse decode and encoder backward; None = on for top-k activations with d_sae >= 4096."""
    log_every: int = 100
    checkpoint_every: int = 1000
    """Steps between checkpoints (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept on disk."""
    device: str = DEFAULT_DEVICE
    """`auto` (cuda if available; under torchrun the local rank's GPU), `cpu`, `cuda`, `cuda:1`, ..."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """`bf16`: encoder/decoder products in bfloat16 (autocast); weights, Adam state and threshold stay float32."""
    wandb_project: str | None = None
    """Also log to Weights & Biases (pip install crossdiff[wandb])."""
    wandb_run_name: str | None = None
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        positive = {"expansion_factor": self.expansion_factor, "k": self.k, "batch_size": self.batch_size,
                    "log_every": self.log_every, "dead_after_tokens": self.dead_after_tokens}
        for key, value in positive.items():
            if value <= 0:
                raise CrossdiffError(f"config key '{key}' must be positive, got {value}")
        for key in ("d_sae", "steps", "k_aux"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise CrossdiffError(f"config key '{key}' must be positive, got {value}")
        if self.lr <= 0 or self.l1_coefficient < 0 or self.auxk_alpha < 0:
            raise CrossdiffError("lr must be positive and l1_coefficient, auxk_alpha non-negative")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise CrossdiffError(f"config key 'adam_betas' must be two numbers in [0, 1), got {self.adam_betas}")
        if not 0 <= self.decay_fraction < 1:
            raise CrossdiffError(f"config key 'decay_fraction' must be in [0, 1), got {self.decay_fraction}")
        if self.decay_fraction > 0 and self.steps is None:
            raise CrossdiffError("decay_fraction needs a fixed number of steps: set 'steps'")
        if not 0 <= self.threshold_beta < 1:
            raise CrossdiffError(f"config key 'threshold_beta' must be in [0, 1), got {self.threshold_beta}")
        if self.warmup_steps < 0 or self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise CrossdiffError("warmup_steps and checkpoint_every must be >= 0, keep_checkpoints >= 1")
        check_variant(self)

    @property
    def uses_topk(self) -> bool:
        return self.activation != "relu"

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based ``step``: warm-up from 0, constant, optional linear decay."""
        factor = 1.0
        if step < self.warmup_steps:
            factor = step / self.warmup_steps
        if self.decay_fraction > 0 and self.steps is not None:
            decay_start = int(self.steps * (1 - self.decay_fraction))
            if step >= decay_start:
                factor = min(factor, (self.steps - step) / (self.steps - decay_start))
        return self.lr * factor


@dataclass
class StreamConfig:
    """A recipe's ``[stream]`` table (used when ``[run] train_from = "stream"`` or ``train --stream``)."""

    buffer_tokens: int = 2**20
    """Shuffle buffer size in tokens (all sources together); memory = buffer_tokens x 2 x d_model x storage bytes."""
    prefetch_batches: int = 4
    """Document batches each background thread computes ahead of the buffer."""
    analysis_tokens: int | None = 1_000_000
    """Tokens per source that the runner still caches (RUN/cache) for the analyze stage when streaming."""

    def __post_init__(self) -> None:
        if self.buffer_tokens < 1 or self.prefetch_batches < 1:
            raise CrossdiffError("stream buffer_tokens and prefetch_batches must be positive")
        if self.analysis_tokens is not None and self.analysis_tokens < 1:
            raise CrossdiffError(f"stream analysis_tokens must be positive, got {self.analysis_tokens}")
