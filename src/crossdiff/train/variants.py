"""Crosscoder variants: which one a run trains, and the options that belong to each.

``TrainConfig.variant`` is the one switch (docs/method.md 8):

* ``standard``    the paper's crosscoder (L1, BatchTopK or TopK; ``activation`` picks);
* ``dfc``         dedicated feature crosscoder: base-exclusive, chat-exclusive and shared
                  latent ranges, forbidden blocks zero (crossdiff.partition);
* ``matryoshka``  Matryoshka BatchTopK: nested dictionary prefixes, each reconstructing
                  the input on its own (crossdiff.train.losses.matryoshka_reconstruction);
* ``delta``       Delta-Crosscoder: BatchTopK plus a loss on the chat-minus-base
                  difference (crossdiff.train.losses.delta_loss).

Each variant's options are TrainConfig keys that default to null; giving one to another
variant is refused in one line, so an option never silently does nothing.
"""

from __future__ import annotations

from typing import Any

from crossdiff.errors import CrossdiffError

VARIANTS = ("standard", "dfc", "matryoshka", "delta")

# TrainConfig key -> (the variant it belongs to, its value when the variant runs and it is null)
OPTIONS: dict[str, tuple[str, Any]] = {
    "dfc_fractions": ("dfc", [0.05, 0.05]),  # dfc_learning's default shares (base, chat)
    "matryoshka_prefixes": ("matryoshka", [0.0625, 0.25, 1.0]),
    "delta_weight": ("delta", 1.0),
}
NEEDS_TOPK = ("matryoshka", "delta")  # built on BatchTopK (or TopK) sparsity


def check_variant(config: Any) -> None:
    """One-line errors for an unknown variant, another variant's option, or a bad value."""
    variant = config.variant
    if variant not in VARIANTS:
        raise CrossdiffError(f"config key 'variant' must be one of {list(VARIANTS)}, got {variant!r}")
    for key, (owner, _) in OPTIONS.items():
        if getattr(config, key) is not None and owner != variant:
            raise CrossdiffError(f"config key '{key}' is an option of variant '{owner}', but this run's variant is '{variant}'")
    if variant in NEEDS_TOPK and config.activation == "relu":
        raise CrossdiffError(f"variant '{variant}' is built on top-k sparsity: set activation to batchtopk or topk, not relu")
    fractions = option(config, "dfc_fractions")
    if variant == "dfc" and (len(fractions) != 2 or any(not 0 <= f <= 1 for f in fractions) or sum(fractions) > 1):
        raise CrossdiffError(f"config key 'dfc_fractions' must be two shares [base, chat] in [0, 1] with sum <= 1, got {fractions}")
    prefixes = option(config, "matryoshka_prefixes")
    if variant == "matryoshka" and (
        not prefixes or any(not 0 < p <= 1 for p in prefixes) or prefixes != sorted(set(prefixes)) or prefixes[-1] != 1
    ):
        raise CrossdiffError(
            f"config key 'matryoshka_prefixes' must be increasing shares of the dictionary in (0, 1] ending at 1, got {prefixes}"
        )
    weight = option(config, "delta_weight")
    if variant == "delta" and weight < 0:
        raise CrossdiffError(f"config key 'delta_weight' must be non-negative, got {weight}")


def option(config: Any, key: str) -> Any:
    """The value of a variant option for this run: as given, or its default when the run is
    of its variant (None when the run is of another one)."""
    owner, default = OPTIONS[key]
    value = getattr(config, key)
    if value is None and config.variant == owner:
        return default
    return value


def matryoshka_sizes(prefixes: list[float], d_sae: int) -> list[int]:
    """Latent counts of the nested prefixes (rounded down, the last = d_sae); one-line error
    when a prefix would hold no latent or two prefixes coincide."""
    sizes = [int(d_sae * p) for p in prefixes[:-1]] + [d_sae]
    if sizes[0] < 1 or len(set(sizes)) != len(sizes):
        raise CrossdiffError(f"matryoshka_prefixes {prefixes} give prefix sizes {sizes} of a {d_sae}-latent dictionary: "
                             "each must hold at least one latent more than the one before")
    return sizes
