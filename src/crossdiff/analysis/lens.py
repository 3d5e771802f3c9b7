"""Logit lens of decoder directions: the tokens a latent promotes and suppresses in each model.

A latent's decoder vector for model m is a direction in m's residual stream. Read as the
model reads its last residual, through its own final norm module (RMSNorm with its
weight, Gemma's ``1 + weight``, GPT-2's LayerNorm with centring and bias) and its
unembedding (the LM head), it gives one logit per token: the tokens with the highest
logits are those the direction promotes, the lowest those it suppresses. Each direction is
first scaled to RMS 1 (norm ``sqrt(d_model)``), so the norm's epsilon and a LayerNorm's
bias weigh the same for every latent. Scores are logits before any final soft-capping
(Gemma 2's is monotone: it changes no ranking).

Crosscoder decoder vectors live in the crosscoder's normalised space; the per-model input
scale is a positive factor per model, which the scaling to RMS 1 removes, so
:func:`latent_lens` reads ``W_dec[latent, m]`` directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from crossdiff.errors import CrossdiffError

NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_norm", "norm_f")


@dataclass
class Lens:
    """Per direction, the ``k`` most promoted and most suppressed token ids with their logits."""

    promoted: Tensor  # [n, k] token ids, highest logit first
    promoted_logits: Tensor  # [n, k]
    suppressed: Tensor  # [n, k] token ids, lowest logit first
    suppressed_logits: Tensor  # [n, k]


def final_norm(model: nn.Module) -> nn.Module:
    """The norm a causal LM applies to its last residual before the LM head."""
    inner = getattr(model, "base_model", model)
    for holder in (inner, getattr(inner, "language_model", None), model):
        for name in NORM_NAMES:
            module = getattr(holder, name, None) if holder is not None else None
            if isinstance(module, nn.Module):
                return module
    raise CrossdiffError(f"cannot find the final norm of {type(model).__name__} (looked for {', '.join(NORM_NAMES)})")


@torch.inference_mode()
def direction_logits(model: nn.Module, directions: Tensor) -> Tensor:
    """Logits [n, V] of residual directions [n, d_model] through ``model``'s final norm and LM head."""
    head = model.get_output_embeddings()
    if head is None:
        raise CrossdiffError(f"{type(model).__name__} has no LM head to read directions through")
    parameter = next(model.parameters())
    x = directions.to(device=parameter.device, dtype=torch.float32)
    x = x / x.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)  # RMS 1
    normed = final_norm(model)(x.to(parameter.dtype)[:, None, :])[:, 0, :]  # [n, 1, d]: as the model's [B, T, d]
    return head(normed).float()


def logit_lens(model: nn.Module, directions: Tensor, k: int = 10, vocab: int | None = None) -> Lens:
    """The ``k`` tokens each direction promotes and suppresses most (only ids below ``vocab``,
    e.g. the tokenizer's length, when the embedding is padded)."""
    logits = direction_logits(model, directions)
    if vocab is not None:
        logits = logits[:, :vocab]
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1)
    bottom = logits.topk(k, dim=-1, largest=False)
    return Lens(top.indices.cpu(), top.values.cpu(), bottom.indices.cpu(), bottom.values.cpu())


def latent_lens(crosscoder: Any, latents: Sequence[int], models: Sequence[nn.Module], tokenizer: Any = None,
                k: int = 10) -> list[dict[str, Any]]:
    """For each latent, per model (``models`` in the crosscoder's order, base first): the tokens
    its decoder vector promotes and suppresses, as ``{"latent", "models": [{"promoted":
    [[token, logit], ...], "suppressed": [...]}, ...]}`` (tokens decoded when ``tokenizer`` is given)."""
    index = torch.as_tensor(list(latents), dtype=torch.long)
    vocab = len(tokenizer) if tokenizer is not None else None
    per_model = [logit_lens(model, crosscoder.W_dec.detach()[index, m], k=k, vocab=vocab) for m, model in enumerate(models)]
    decode = (lambda i: tokenizer.decode([i])) if tokenizer is not None else (lambda i: i)
    out = []
    for row, latent in enumerate(index.tolist()):
        out.append({"latent": latent, "models": [
            {"promoted": [[decode(int(t)), float(v)] for t, v in zip(lens.promoted[row], lens.promoted_logits[row])],
             "suppressed": [[decode(int(t)), float(v)] for t, v in zip(lens.suppressed[row], lens.suppressed_logits[row])]}
            for lens in per_model]})
    return out
