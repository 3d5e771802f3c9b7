"""Logit lens of decoder directions against brute force on tiny models: the model's own
forward from a residual after its last block, and unembedding rows that rank their token first."""

from __future__ import annotations

import pytest
import torch

from crossdiff.analysis.lens import direction_logits, final_norm, latent_lens, logit_lens

ARCHS = ("llama", "gemma2", "gpt2", "qwen2")


def _model(path, seed: int = 0):
    """The tiny model with a final norm whose weight is random (so that applying it matters)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm = final_norm(model)
        norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=generator))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(0.1 * torch.randn(norm.bias.shape, generator=generator))
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_lens_is_the_models_own_forward_from_the_last_block(arch, tiny_model_pairs):
    from crossdiff.causal.upper import SplitModel
    from crossdiff.models import decoder_layers

    model = _model(tiny_model_pairs[arch][1])
    directions = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 3.0
    ours = direction_logits(model, directions)
    # Brute force: the residual after the last block is the direction (at RMS 1), at one position;
    # the model's forward applies its final norm, LM head and any soft-capping.
    split = SplitModel(model, len(decoder_layers(model)) - 1)
    scaled = directions / directions.pow(2).mean(-1, keepdim=True).sqrt()
    ids = torch.ones(5, 1, dtype=torch.long)
    brute = split.upper(scaled[:, None, :], ids, torch.ones_like(ids))[:, 0, :]
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma 2 soft-caps after the head; the lens reports logits before it (same ranking)
        ours = torch.tanh(ours / cap) * cap
    torch.testing.assert_close(ours, brute, rtol=1e-4, atol=1e-5)
    assert torch.equal(logit_lens(model, directions, k=7).promoted, brute.topk(7).indices)
    assert torch.equal(logit_lens(model, directions, k=7).suppressed, brute.topk(7, largest=False).indices)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_tokens_unembedding_row_ranks_that_token_first(arch, tiny_model_pairs):
    model = _model(tiny_model_pairs[arch][1])
    norm = final_norm(model)
    gain = norm.weight.detach() + (1.0 if arch == "gemma2" else 0.0)  # Gemma's RMSNorm scales by 1 + weight
    rows = model.get_output_embeddings().weight.detach()
    tokens = [3, 17, 100, 257, 511]
    # Undo the norm's gain, so that after the model's final norm the direction is the row itself
    # (LayerNorm also centres it).
    directions = rows[tokens] / gain
    if arch == "gpt2":  # no bias: the rows are then read after LayerNorm's centring only
        with torch.no_grad():
            norm.bias.zero_()
    lens = logit_lens(model, directions, k=3)
    assert lens.promoted[:, 0].tolist() == tokens
    # Without undoing the gain the model's norm changes what is read: the lens applies it.
    unscaled = direction_logits(model, rows[tokens])
    manual = (rows @ (gain[:, None] * (rows[tokens] / rows[tokens].pow(2).mean(-1, keepdim=True).sqrt()).T)).T
    if arch != "gpt2":
        torch.testing.assert_close(unscaled, manual, rtol=1e-4, atol=1e-5)


def test_latent_lens_reads_each_models_decoder_vector(tiny_model_pairs, tiny_tokenizer):
    from crossdiff.crosscoder import CrossCoder, CrossCoderConfig

    base, chat = (_model(path, seed) for seed, path in enumerate(tiny_model_pairs["llama"]))
    d = base.config.hidden_size
    crosscoder = CrossCoder(CrossCoderConfig(d_in=d, d_sae=8, n_models=2, activation="relu"), seed=0)
    rows = chat.get_output_embeddings().weight.detach()
    token = tiny_tokenizer.convert_tokens_to_ids("<end_of_turn>")
    with torch.no_grad():
        crosscoder.W_dec[2, 1] = rows[token] / final_norm(chat).weight  # latent 2 writes <end_of_turn> into chat
    out = latent_lens(crosscoder, [2, 5], [base, chat], tiny_tokenizer, k=4)
    assert [o["latent"] for o in out] == [2, 5]
    assert out[0]["models"][1]["promoted"][0][0] == "<end_of_turn>"
    assert len(out[0]["models"]) == 2 and len(out[1]["models"][0]["suppressed"]) == 4
