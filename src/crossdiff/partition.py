"""The dictionary partition of dedicated feature crosscoders (DFC).

Jiralerspong and Bricken (arXiv 2602.11729), with the layout and rounding of their code
(superkaiba/dfc_learning, ``FeaturePartition``): a dictionary of D latents is split into

    [0, a)          base-exclusive: only model 0 (base) encodes from and decodes to them
    [a, a + b)      chat-exclusive: only model 1 (chat)
    [a + b, D)      shared by both

with a = int(D * base_fraction), b = int(D * chat_fraction). The *forbidden* blocks, a
model's encoder columns and decoder rows of the other model's exclusive latents, are zero
from the start and stay zero: training zeroes their gradients before clipping and Adam
(as dfc_learning's gradient hooks do), so Adam's moments never leave zero and no loss
term, the dead-latent auxiliary loss included, can move them. Biases are not partitioned.

The partition is an architectural prior: a chat-exclusive latent has a base decoder norm of
exactly 0 (relative decoder norm 1), so everything that reads W_dec works unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from crossdiff.errors import CrossdiffError


def partition_sizes(d_sae: int, base_fraction: float, chat_fraction: float) -> list[int]:
    """[base-exclusive, chat-exclusive] latent counts, rounded down as dfc_learning's
    ``FeaturePartition.from_percentages`` does (``int(d_sae * fraction)``, float product)."""
    return [int(d_sae * base_fraction), int(d_sae * chat_fraction)]


def partition_of_dictionary_learning(config: object, d_sae: int, source: str) -> list[int]:
    """The partition of a dfc_learning checkpoint from its ``_partition_config``
    ({dict_size, model_a_exclusive_pct, model_b_exclusive_pct}); model A is the base."""
    keys = ("dict_size", "model_a_exclusive_pct", "model_b_exclusive_pct")
    if not isinstance(config, dict) or any(key not in config for key in keys):
        raise CrossdiffError(f"{source}: _partition_config must hold {', '.join(keys)}, got {config!r}")
    if config["dict_size"] != d_sae:
        raise CrossdiffError(
            f"{source}: the DFC partition was made for a dictionary of {config['dict_size']} latents, "
            f"the weights have {d_sae}"
        )
    a, b = (float(config[key]) for key in keys[1:])
    if not (0 <= a <= 1 and 0 <= b <= 1):
        raise CrossdiffError(f"{source}: DFC exclusive shares must lie in [0, 1], got {a} and {b}")
    return partition_sizes(d_sae, a, b)


def check_partition(partition: list[int], d_sae: int, n_models: int, source: str = "dfc_partition") -> None:
    """One-line error unless ``partition`` [base-exclusive, chat-exclusive] fits a two-model dictionary of ``d_sae``."""
    if n_models != 2:
        raise CrossdiffError(f"{source}: a dedicated feature crosscoder partitions two models, this one has {n_models}")
    if len(partition) != 2 or any(size < 0 for size in partition):
        raise CrossdiffError(f"{source} must be two non-negative latent counts [base-exclusive, chat-exclusive], got {partition}")
    if sum(partition) > d_sae:
        raise CrossdiffError(
            f"{source} {list(partition)} does not fit the dictionary: {sum(partition)} exclusive latents, d_sae = {d_sae}"
        )


def allowed_latents(partition: list[int], d_sae: int, device: torch.device | str | None = None) -> Tensor:
    """[d_sae, 2] bool: whether latent j may use model m (False in the forbidden blocks)."""
    base_only, chat_only = partition
    allowed = torch.ones(d_sae, 2, dtype=torch.bool, device=device)
    allowed[base_only:base_only + chat_only, 0] = False  # chat-exclusive latents have no base vectors
    allowed[:base_only, 1] = False  # base-exclusive latents have no chat vectors
    return allowed


@torch.no_grad()
def zero_forbidden(W_enc: Tensor, W_dec: Tensor, allowed: Tensor) -> None:
    """Zero the forbidden blocks of W_enc [2, d, D] and W_dec [D, 2, d] (or of their gradients) in place."""
    W_enc.masked_fill_(~allowed.T[:, None, :], 0.0)
    W_dec.masked_fill_(~allowed[:, :, None], 0.0)


def largest_forbidden(W_enc: Tensor, W_dec: Tensor, allowed: Tensor) -> float:
    """The largest |value| in the forbidden blocks (0.0 for an intact partition)."""
    enc = W_enc.detach().abs().masked_fill(allowed.T[:, None, :], 0.0)
    dec = W_dec.detach().abs().masked_fill(allowed[:, :, None], 0.0)
    return float(torch.maximum(enc.max(), dec.max()))
