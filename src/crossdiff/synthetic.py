"""Paired activations with planted features: ground truth for tests, benchmarks and docs.

Each feature has one direction per model (a zero vector where the model lacks it) and a
strength per model. Tokens are sparse sums of active features plus a little noise:

    x_m(t) = sum_f a_f(t) * strength[f, m] * direction[f, m] + noise

Feature kinds, with model 0 the base and model 1 the chat model:

* ``shared``      present in both, same strength;
* ``chat_only``   present only in the chat model (what diffing should find);
* ``base_only``   present only in the base model;
* ``different``   present in both, but weaker in the base (``base_strength`` of chat's).

A crosscoder that learns the features should give chat-only latents a relative decoder
norm near 1, base-only near 0, shared near 0.5, and ``different`` ones in between.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
from torch import Tensor

KINDS = ("shared", "chat_only", "base_only", "different")


@dataclass
class SyntheticConfig:
    d_in: int = 64
    n_shared: int = 32
    n_chat_only: int = 8
    n_base_only: int = 8
    n_different: int = 8
    base_strength: float = 0.4
    """Strength in the base model of `different` features, relative to the chat model."""
    p_active: float = 0.03
    """Probability that a feature fires on a token."""
    magnitude_range: tuple[float, float] = (0.5, 2.0)
    """Activations of firing features are uniform in this range."""
    chat_rotation: float = 0.0
    """Angle-like perturbation of shared directions in the chat model (0 = identical)."""
    noise: float = 0.01
    seed: int = 0

    @property
    def n_features(self) -> int:
        return self.n_shared + self.n_chat_only + self.n_base_only + self.n_different


class SyntheticSample(NamedTuple):
    acts: Tensor
    """[N, 2, d_in] paired activations (base, chat)."""
    codes: Tensor
    """[N, n_features] the planted feature activations a_f(t)."""


class SyntheticPair:
    """A pair of 'models' defined by planted features; sample as many tokens as needed."""

    def __init__(self, config: SyntheticConfig | None = None):
        self.config = config = config or SyntheticConfig()
        g = torch.Generator().manual_seed(config.seed)
        counts = [config.n_shared, config.n_chat_only, config.n_base_only, config.n_different]
        self.kinds: list[str] = [kind for kind, count in zip(KINDS, counts) for _ in range(count)]
        n_features, d = config.n_features, config.d_in

        base_dirs = _unit(torch.randn(n_features, d, generator=g))
        chat_dirs = base_dirs + config.chat_rotation * _unit(torch.randn(n_features, d, generator=g))
        self.directions = torch.stack([base_dirs, _unit(chat_dirs)], dim=1)  # [F, 2, d]

        strength = torch.ones(n_features, 2)
        kind_of = torch.tensor([KINDS.index(k) for k in self.kinds])
        strength[kind_of == KINDS.index("chat_only"), 0] = 0.0
        strength[kind_of == KINDS.index("base_only"), 1] = 0.0
        strength[kind_of == KINDS.index("different"), 0] = config.base_strength
        self.strength = strength  # [F, 2]

    def features_of(self, kind: str) -> Tensor:
        """Indices of the planted features of one kind."""
        return torch.tensor([i for i, k in enumerate(self.kinds) if k == kind], dtype=torch.long)

    @property
    def decoder_truth(self) -> Tensor:
        """[F, 2, d_in] ground-truth per-model decoder vectors (direction * strength)."""
        return self.directions * self.strength[:, :, None]

    def sample(self, n_tokens: int, generator: torch.Generator) -> SyntheticSample:
        c = self.config
        fires = torch.rand(n_tokens, c.n_features, generator=generator) < c.p_active
        lo, hi = c.magnitude_range
        magnitude = lo + (hi - lo) * torch.rand(n_tokens, c.n_features, generator=generator)
        codes = fires * magnitude
        truth = self.decoder_truth.reshape(c.n_features, 2 * c.d_in)
        acts = (codes @ truth).reshape(n_tokens, 2, c.d_in)
        acts = acts + c.noise * torch.randn(acts.shape, generator=generator)
        return SyntheticSample(acts, codes)

    def batches(self, batch_size: int, n_batches: int | None = None, seed: int = 0) -> Iterator[Tensor]:
        """An endless (or ``n_batches`` long) stream of [batch_size, 2, d_in] batches."""
        generator = torch.Generator().manual_seed(seed)
        produced = 0
        while n_batches is None or produced < n_batches:
            yield self.sample(batch_size, generator).acts
            produced += 1


def best_match_cosines(learned: Tensor, planted: Tensor) -> Tensor:
    """For each planted vector [F, k], the best cosine with any learned vector [D, k]."""
    cos = _unit(planted) @ _unit(learned).T
    return cos.max(dim=1).values


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
