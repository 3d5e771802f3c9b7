"""The upper half of a model run from the residual after block L is the model's own forward."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_ARCHS, TINY_N_LAYERS
from crossdiff.causal import SplitModel
from crossdiff.models import load_model_pair, pad_batch

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["The quick brown fox jumps over the lazy dog, again and again and again.", "Hi", "Numbers like 1, 2, 3 and 42."]


@pytest.fixture(scope="module")
def pairs(tiny_model_pairs):
    return {arch: load_model_pair(*tiny_model_pairs[arch], dtype="float32") for arch in TINY_ARCHS}


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("layer", [0, 1, TINY_N_LAYERS - 1])
def test_unedited_residual_gives_the_models_own_logits(pairs, arch, layer):
    pair = pairs[arch]
    input_ids, attention_mask = pad_batch([pair.tokenizer(t)["input_ids"] for t in TEXTS], pair.tokenizer.pad_token_id)
    if arch == "gemma2":  # soft-capping must be applied, and must matter on these logits
        pair.chat.config.final_logit_softcapping = 0.5
    try:
        with torch.inference_mode():
            own = pair.chat(input_ids=input_ids, attention_mask=attention_mask).logits
        split = SplitModel(pair.chat, layer)
        residual = split.lower(input_ids, attention_mask)
        real = attention_mask.bool()
        torch.testing.assert_close(split.upper(residual, input_ids, attention_mask)[real], own[real], rtol=1e-5, atol=1e-5)
        # Only the scored rows go through the LM head, in row-major order.
        scored = real.clone()
        scored[:, 0] = False
        torch.testing.assert_close(split.upper(residual, input_ids, attention_mask, scored), own[scored], rtol=1e-5, atol=1e-5)
        if arch == "gemma2":
            assert own.abs().max() <= 0.5
    finally:
        if arch == "gemma2":
            pair.chat.config.final_logit_softcapping = None
    # The blocks are back in place after the call, and an edited residual really changes the output.
    assert all(type(block).__name__ != "_StandIn" for block in split.blocks)
    changed = split.upper(residual + torch.randn_like(residual), input_ids, attention_mask)  # not a constant: LayerNorm ignores those
    assert (changed[real] - own[real]).abs().max() > 1e-3


def test_upper_runs_only_the_blocks_above_the_layer(pairs):
    pair = pairs["llama"]
    calls = []
    handles = [block.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, block in enumerate(SplitModel(pair.chat, 1).blocks)]
    try:
        input_ids, attention_mask = pad_batch([pair.tokenizer("Hi there")["input_ids"]], pair.tokenizer.pad_token_id)
        split = SplitModel(pair.chat, 1)
        residual = split.lower(input_ids, attention_mask)
        assert calls == [0, 1]  # early exit after block 1
        calls.clear()
        split.upper(residual, input_ids, attention_mask)
        assert calls == [2, 3]
    finally:
        for handle in handles:
            handle.remove()
