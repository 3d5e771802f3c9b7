"""Steer the base with latents' own activations, and find a behaviour's latents by attribution.

A constant steering vector (:mod:`crossdiff.causal.steer`) pushes every position the same
way. On SmolLM2 and its LoRA organism that gives a planted behaviour's *manner* ("I can't
help you with cooking", "mate") but rarely its words, even with the behaviour's best
latents: the fine-tune made the behaviour by changing the residual differently at each
position (docs/real-pair.md). A crosscoder knows what each latent adds at each position:
with both models run side by side on the same tokens, latent j's activation f_j(t) (encoded
from the paired residuals, exactly as in training) times the difference of its decoders,
``delta_j = d_j^chat / s_chat - d_j^base / s_base`` (model space), is the part of the chat
model's residual that latent j carries beyond the base's. **Activation steering** adds

    factor x sum_{j in S} f_j(t) delta_j

to the base's residual after the crosscoder's block at every position, prompt and generated
(the chat model follows the base's tokens in lockstep, one KV cache each). Factor 1 with S =
all latents is the paper's ``All`` condition applied while generating; a small S that
reproduces a behaviour, when random sets of the same size do not, shows that those latents
carry it. Tokens the crosscoder's training left out (its recorded token filter: attention
sinks, norm outliers) get f = 0, as in the KL experiment (crossdiff.causal.conditions).

**Attribution** finds such an S from training prompts only: the chat model answers each
prompt greedily; on prompt plus answer the base is continued from its own residual plus
every latent's part, ``h_base + sum_j f_j delta_j``, and the gradient g_t of the answer's
log-likelihood gives latent j the first-order effect of its part on the chat's answer,
``a_j = sum_t f_j(t) delta_j . g_t`` (attribution patching). The latents with the largest
a_j, averaged over the prompts, are the behaviour's.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from crossdiff.causal.conditions import Conditions
from crossdiff.causal.conversations import user_prompt_ids
from crossdiff.causal.upper import SplitModel
from crossdiff.models import ResidualExtractor, decoder_layers


def _hidden(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output: Any, hidden: Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class _Lockstep:
    """Hooks that add, to row r of the base's residual after ``layer``, ``sum_j weights[r, j] f_j delta_j``,
    f read from the base's and the chat's residuals at the same positions of the same tokens."""

    def __init__(self, pair: Any, conditions: Conditions, layer: int, weights: Tensor):
        self.conditions = conditions
        used = torch.nonzero(weights.any(0)).flatten()  # only latents some row steers: a small product
        self.used, self.weights, self.delta = used, weights[:, used], conditions.delta[used]
        self.chat_hidden: Tensor | None = None
        self.positions: Tensor | None = None
        self.token_ids: Tensor | None = None
        self.handles = [decoder_layers(pair.chat)[layer].register_forward_hook(self._capture),
                        decoder_layers(pair.base)[layer].register_forward_hook(self._add)]

    def _capture(self, module: Any, args: Any, output: Any) -> None:
        self.chat_hidden = _hidden(output)

    def _add(self, module: Any, args: Any, output: Any) -> Any:
        base = _hidden(output)
        B, T, d = base.shape
        f = self.conditions.encode(base.reshape(B * T, d).float(), self.chat_hidden.reshape(B * T, d).float(),
                                   self.positions.reshape(-1), self.token_ids.reshape(-1))
        push = (f[:, self.used].reshape(B, T, -1) * self.weights[:, None, :]) @ self.delta
        return _replace_hidden(output, base + push.to(base.dtype))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.inference_mode()
def generate_with_latents(pair: Any, conditions: Conditions, layer: int, prompt: str, latent_sets: list[Any],
                          factors: list[float], *, max_new_tokens: int, stop_ids: list[int]) -> tuple[str, list[list[str]]]:
    """The base's greedy answers to one chat prompt: unsteered, then for each latent set one per
    factor, all in one batch (the same prompt in every row, so no padding)."""
    device = next(pair.base.parameters()).device
    weights = torch.zeros(1 + len(latent_sets) * len(factors), conditions.delta.shape[0], device=device)
    for i, latents in enumerate(latent_sets):
        for k, factor in enumerate(factors):
            weights[1 + i * len(factors) + k, torch.as_tensor(latents, device=device)] = factor
    rows = weights.shape[0]
    hooks = _Lockstep(pair, conditions, layer, weights)
    step, start, answer = torch.tensor([user_prompt_ids(pair.tokenizer, prompt)], device=device).repeat(rows, 1), 0, [[] for _ in range(rows)]
    caches = [_kv_cache(pair.base), _kv_cache(pair.chat)]  # filled in place by each forward
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    try:
        for _ in range(max_new_tokens):
            hooks.positions = torch.arange(start, start + step.shape[1], device=device).repeat(rows, 1)
            hooks.token_ids = step
            pair.chat(input_ids=step, use_cache=True, **caches[1])  # fills hooks.chat_hidden
            base = pair.base(input_ids=step, use_cache=True, **caches[0])
            start += step.shape[1]
            token = base.logits[:, -1].argmax(-1)
            done |= torch.isin(token, torch.tensor(stop_ids, device=device))
            for row in range(rows):
                if not done[row]:
                    answer[row].append(int(token[row]))
            if bool(done.all()):
                break
            step = token[:, None]
    finally:
        hooks.remove()
    texts = [pair.tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in answer]
    return texts[0], [texts[1 + i * len(factors): 1 + (i + 1) * len(factors)] for i in range(len(latent_sets))]


def _kv_cache(model: Any) -> dict[str, Any]:
    """An empty KV cache as the keyword the model's forward takes (``cache`` in transformers 5.x,
    ``past_key_values`` before)."""
    # deferred: transformers takes seconds to import, and causal.steer (so the report) imports this module
    from transformers import DynamicCache

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: DynamicCache()}


def latent_attribution(pair: Any, conditions: Conditions, layer: int, prompts: list[str], *, max_new_tokens: int,
                       stop_ids: list[int]) -> Tensor:
    """Each latent's mean first-order effect on the log-likelihood of the chat model's own answers
    to ``prompts``, when its chat-minus-base part is added to the base's residual ([D], float32)."""
    device = next(pair.base.parameters()).device
    extract, upper = ResidualExtractor(pair, layer), SplitModel(pair.base, layer)
    total = torch.zeros(conditions.delta.shape[0], device=device)
    for prompt in prompts:
        prompt_tokens = user_prompt_ids(pair.tokenizer, prompt)
        answer = _greedy(pair.chat, prompt_tokens, max_new_tokens, stop_ids)
        if not answer:
            continue
        ids = torch.tensor([prompt_tokens + answer], device=device)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            base, chat = extract(ids, mask)
            f = conditions.encode(base[0].float(), chat[0].float(), torch.arange(ids.shape[1], device=device), ids[0])
        f, base = f.clone(), base.clone()  # tensors made under inference_mode cannot enter an autograd graph
        residual = (base[0].float() + f @ conditions.delta).requires_grad_(True)
        targets = torch.zeros_like(ids, dtype=torch.bool)
        targets[0, len(prompt_tokens) - 1:-1] = True  # the positions that predict the answer's tokens
        logits = upper.upper(residual[None], ids, mask, positions=targets, grad=True)
        likelihood = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(answer, device=device)[:, None]).sum()
        (gradient,) = torch.autograd.grad(likelihood, residual)
        total += (f * (gradient @ conditions.delta.T)).sum(0)
    return (total / max(1, len(prompts))).detach()


@torch.inference_mode()
def _greedy(model: Any, prompt_tokens: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
    ids = torch.tensor([prompt_tokens], device=next(model.parameters()).device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=stop_ids, pad_token_id=stop_ids[0])
    row = out[0, ids.shape[1]:].tolist()
    return row[: next((i for i, t in enumerate(row) if t in stop_ids), len(row))]
