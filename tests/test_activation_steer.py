"""Activation steering and latent attribution (crossdiff.causal.activation_steer) against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crossdiff.causal.activation_steer import generate_with_latents, latent_attribution
from crossdiff.causal.conditions import Conditions
from crossdiff.causal.conversations import end_of_turn_ids, user_prompt_ids
from crossdiff.causal.planted import ceiling_answers
from crossdiff.models import load_model_pair
from test_causal import _exact_crosscoder, greedy_with_block_output

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Write a poem about the sea.", "Hi"]
LAYER, NEW = 1, 6


def _setup(tiny_model_pairs):
    pair = load_model_pair(*tiny_model_pairs["llama"], dtype="float32")
    crosscoder = _exact_crosscoder(pair.d_model, (2.0, 0.5))  # latents +-x_base_i (first 2d), +-x_chat_i (last 2d)
    return pair, crosscoder, Conditions(crosscoder, []), end_of_turn_ids(pair.tokenizer, pair.chat)


def _brute_force(pair, crosscoder, latents, factor, prompt, stop) -> str:
    """No KV cache: every step recomputes both models' residuals on the whole sequence, adds
    factor x sum_{j in latents} f_j delta_j, and continues the base from there."""
    scale, W = crosscoder.input_scale, crosscoder.W_dec.detach()
    delta = (W[:, 1] / scale[1] - W[:, 0] / scale[0])[latents]

    def steered(x):
        hb = pair.base(input_ids=x, output_hidden_states=True).hidden_states[LAYER + 1][0]
        hc = pair.chat(input_ids=x, output_hidden_states=True).hidden_states[LAYER + 1][0]
        f = torch.relu(torch.einsum("tmd,mdk->tk", torch.stack([hb, hc], 1) * scale[None, :, None], crosscoder.W_enc)
                       + crosscoder.b_enc)
        return (hb + factor * f[:, latents] @ delta)[None]
    return greedy_with_block_output(pair, LAYER, prompt, NEW, stop, steered)


def test_activation_steering_equals_a_brute_force_loop_and_all_latents_give_the_chat_residual(tiny_model_pairs):
    pair, crosscoder, conditions, stop = _setup(tiny_model_pairs)
    D = crosscoder.config.d_sae
    sets = [np.arange(0, D, 3), np.arange(D // 2, D)]  # steered side by side in one batch
    for prompt in PROMPTS:
        unsteered, steered = generate_with_latents(pair, conditions, LAYER, prompt, sets, [0.5, 2.0], max_new_tokens=NEW,
                                                   stop_ids=stop)
        assert unsteered == _brute_force(pair, crosscoder, sets[0], 0.0, prompt, stop)
        for latents, texts in zip(sets, steered):
            assert texts == [_brute_force(pair, crosscoder, latents, f, prompt, stop) for f in (0.5, 2.0)]
    # Every latent at factor 1 adds the whole chat-minus-base difference: the base runs on the
    # chat's residual, which is what the ceiling measures.
    everything = [generate_with_latents(pair, conditions, LAYER, p, [np.arange(D)], [1.0], max_new_tokens=NEW,
                                        stop_ids=stop)[1][0][0] for p in PROMPTS]
    assert everything == ceiling_answers(pair, LAYER, PROMPTS, NEW)
    assert any(everything)


def test_attribution_is_the_derivative_of_the_answer_likelihood(tiny_model_pairs):
    """a_j equals d/de log p(chat's answer | h_base + sum f delta + e f_j delta_j) at e = 0, by central differences."""
    from crossdiff.causal.upper import SplitModel
    from crossdiff.models import ResidualExtractor

    pair, crosscoder, conditions, stop = _setup(tiny_model_pairs)
    prompt = PROMPTS[0]
    attribution = latent_attribution(pair, conditions, LAYER, [prompt], max_new_tokens=NEW, stop_ids=stop)

    prompt_tokens = user_prompt_ids(pair.tokenizer, prompt)
    ids = pair.chat.generate(input_ids=torch.tensor([prompt_tokens]), max_new_tokens=NEW, do_sample=False,
                             eos_token_id=stop, pad_token_id=stop[0])[0].tolist()
    answer = ids[len(prompt_tokens):]
    answer = answer[: next((i for i, t in enumerate(answer) if t in stop), len(answer))]
    ids = torch.tensor([prompt_tokens + answer])
    mask = torch.ones_like(ids)
    base, chat = ResidualExtractor(pair, LAYER)(ids, mask)
    f = conditions.encode(base[0], chat[0])
    steered = base[0] + f @ conditions.delta
    split = SplitModel(pair.base, LAYER)

    def likelihood(residual):
        logits = split.upper(residual[None], ids, mask)[0, len(prompt_tokens) - 1:-1]
        return float(torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(answer)[:, None]).sum())

    eps = 1e-2
    for j in torch.argsort(attribution.abs(), descending=True)[:4].tolist():
        push = f[:, j:j + 1] * conditions.delta[j]
        numeric = (likelihood(steered + eps * push) - likelihood(steered - eps * push)) / (2 * eps)
        assert float(attribution[j]) == pytest.approx(numeric, rel=0.05, abs=1e-4)
    assert float(attribution.abs().max()) > 1e-3  # something to compare


def test_activation_steering_options_are_checked_in_one_line():
    from crossdiff.causal.config import SteerConfig
    from crossdiff.errors import CrossdiffError

    common = dict(crosscoder="c", analysis_dir="a", latents=["1"])
    with pytest.raises(CrossdiffError, match="--how must be one of direction, activation"):
        SteerConfig(**common, how="patch")
    for bad in (dict(model="chat"), dict(positions="prompt")):
        with pytest.raises(CrossdiffError, match="--how activation steers the base at every position"):
            SteerConfig(**common, how="activation", **bad)
    assert SteerConfig(**common, how="activation").how == "activation"
