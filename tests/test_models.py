"""Model pairs: loading, pair checks, and residual extraction with early exit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY_ARCHS, TINY_D_MODEL, TINY_N_LAYERS, build_tiny_tokenizer
from crossdiff.errors import CrossdiffError
from crossdiff.devices import parse_device
from crossdiff.models import (
    ModelPair,
    ResidualExtractor,
    check_same_tokenization,
    decoder_layers,
    load_model_pair,
    pad_batch,
    parse_dtype,
)

FINAL_NORM = {"llama": "model.norm", "gemma2": "model.norm", "qwen2": "model.norm", "gpt2": "transformer.ln_f"}
TEXTS = [
    "The quick brown fox jumps over the lazy dog, again and again and again.",
    "Hi",
    "Numbers like 1, 2, 3 and 42.",
]


@pytest.fixture(scope="module")
def pairs(tiny_model_pairs) -> dict[str, ModelPair]:
    return {arch: load_model_pair(*tiny_model_pairs[arch], dtype="float32") for arch in TINY_ARCHS}


def _batch(pair: ModelPair, texts=TEXTS):
    return pad_batch([pair.tokenizer(text)["input_ids"] for text in texts], pair.tokenizer.pad_token_id)


def _hidden_states(model, input_ids, attention_mask):
    with torch.inference_mode():
        return model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_pair_metadata(pairs, arch):
    pair = pairs[arch]
    assert (pair.d_model, pair.n_layers) == (TINY_D_MODEL, TINY_N_LAYERS)
    assert pair.dtype == torch.float32 and pair.device == torch.device("cpu")
    assert not pair.base.training and not any(p.requires_grad for p in pair.chat.parameters())
    assert pair.tokenizer.chat_template  # the chat tokenizer is the one kept


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("layer", [1, TINY_N_LAYERS - 2])
def test_extracted_residual_equals_hidden_state(pairs, arch, layer):
    pair = pairs[arch]
    input_ids, attention_mask = _batch(pair)
    base, chat = ResidualExtractor(pair, layer)(input_ids, attention_mask)
    real = attention_mask.bool()
    assert base.shape == chat.shape == (*input_ids.shape, TINY_D_MODEL)
    for acts, model in ((base, pair.base), (chat, pair.chat)):
        expected = _hidden_states(model, input_ids, attention_mask)[layer + 1]
        torch.testing.assert_close(acts[real], expected[real], rtol=1e-5, atol=1e-5)
    # The two models really differ, so a mix-up of base and chat would be caught.
    assert (base[real] - chat[real]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_padding_does_not_change_real_tokens(pairs, arch):
    pair = pairs[arch]
    extract = ResidualExtractor(pair, 2)
    input_ids, attention_mask = _batch(pair)
    batched_base, batched_chat = extract(input_ids, attention_mask)
    for row in range(len(TEXTS)):
        length = int(attention_mask[row].sum())
        alone_base, alone_chat = extract(input_ids[row : row + 1, :length], attention_mask[row : row + 1, :length])
        torch.testing.assert_close(batched_base[row, :length], alone_base[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched_chat[row, :length], alone_chat[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_last_layer_is_raw_block_output(pairs, arch):
    """hidden_states[-1] has the final norm applied; the extractor returns the block output itself."""
    pair = pairs[arch]
    input_ids, attention_mask = _batch(pair)
    base, _ = ResidualExtractor(pair, TINY_N_LAYERS - 1)(input_ids, attention_mask)
    final_norm = pair.base.get_submodule(FINAL_NORM[arch])
    real = attention_mask.bool()
    with torch.inference_mode():
        normed = final_norm(base)
    torch.testing.assert_close(normed[real], _hidden_states(pair.base, input_ids, attention_mask)[-1][real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_early_exit_skips_later_blocks_and_head(pairs, arch):
    pair = pairs[arch]
    layer = 1
    calls = []
    hooks_before = dict(decoder_layers(pair.base)[layer]._forward_hooks)
    watched = [decoder_layers(pair.base)[layer], decoder_layers(pair.base)[layer + 1], pair.base.get_output_embeddings()]
    handles = [m.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, m in enumerate(watched)]
    try:
        ResidualExtractor(pair, layer)(*_batch(pair))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [0]  # block L ran; block L+1 and the LM head did not
    assert dict(decoder_layers(pair.base)[layer]._forward_hooks) == hooks_before  # our capture hook was removed


def test_layer_out_of_range(pairs):
    for layer in (TINY_N_LAYERS, -1, 100):
        with pytest.raises(CrossdiffError, match=rf"layer {layer} out of range: .*valid layers 0\.\.{TINY_N_LAYERS - 1}"):
            ResidualExtractor(pairs["llama"], layer)


def test_left_padding_is_rejected(pairs):
    input_ids, attention_mask = _batch(pairs["llama"])
    with pytest.raises(ValueError, match="right-padded"):
        ResidualExtractor(pairs["llama"], 1)(input_ids, attention_mask.flip(1))


def test_decoder_layers_found_by_search():
    """An architecture with its blocks at an unknown path: the ModuleList with num_hidden_layers entries."""
    from types import SimpleNamespace

    class Unusual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(num_hidden_layers=3)
            self.heads = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])
            self.stack = torch.nn.Module()
            self.stack.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])

    model = Unusual()
    assert decoder_layers(model) is model.stack.blocks
    model.config.num_hidden_layers = 5
    with pytest.raises(CrossdiffError, match="cannot find the decoder blocks of Unusual: no nn.ModuleList of length 5"):
        decoder_layers(model)


def test_pad_batch():
    input_ids, attention_mask = pad_batch([[5, 6, 7], [8]], pad_token_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert input_ids.dtype == attention_mask.dtype == torch.long


def test_different_widths_are_refused(make_tiny_model_pair):
    base, chat = make_tiny_model_pair("llama", chat_overrides={"hidden_size": 48})
    for weights in chat.glob("*.safetensors"):  # refused from the configs, before any weights are read
        weights.unlink()
    with pytest.raises(CrossdiffError, match=r"^residual widths differ: base 32, chat 48$"):
        load_model_pair(base, chat, dtype="float32")


def test_different_vocabularies_are_refused(make_tiny_model_pair, tmp_path, tiny_tokenizer):
    chat_tokenizer = build_tiny_tokenizer(tmp_path / "tok", extra_tokens=["<tool_call>"])
    base, chat = make_tiny_model_pair("qwen2", chat_overrides={"vocab_size": 640}, chat_tokenizer=chat_tokenizer)
    expected = rf"^vocabularies differ: base tokenizer has {len(tiny_tokenizer)} tokens, chat {len(tiny_tokenizer) + 1}$"
    with pytest.raises(CrossdiffError, match=expected):
        load_model_pair(base, chat, dtype="float32")


def test_different_tokenizer_behaviour_is_refused(make_tiny_model_pair, tmp_path):
    from tokenizers import normalizers

    chat_tokenizer = build_tiny_tokenizer(tmp_path / "tok")
    chat_tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()  # same vocabulary, different ids
    base, chat = make_tiny_model_pair("llama", chat_tokenizer=chat_tokenizer)
    with pytest.raises(CrossdiffError, match=r"^tokenizers differ on text 'Hello world!.*first difference at token 1$"):
        load_model_pair(base, chat, dtype="float32")


def test_check_same_tokenization_names_the_text(tiny_tokenizer, tmp_path):
    from tokenizers import normalizers

    other = build_tiny_tokenizer(tmp_path / "tok")
    other.backend_tokenizer.normalizer = normalizers.Lowercase()
    check_same_tokenization((tiny_tokenizer, other), ["all lower case is fine"])
    with pytest.raises(CrossdiffError, match="tokenizers differ on text 'but Not This'"):
        check_same_tokenization((tiny_tokenizer, other), ["all lower case is fine", "but Not This"])


def test_embedding_smaller_than_tokenizer_is_refused(make_tiny_model_pair, tiny_tokenizer):
    base, chat = make_tiny_model_pair("llama", chat_overrides={"vocab_size": 100})
    with pytest.raises(CrossdiffError, match=rf"tokenizer has {len(tiny_tokenizer)} tokens but the chat model embeds only 100"):
        load_model_pair(base, chat, dtype="float32")


def test_dtype_and_missing_model(tiny_pair_paths, tmp_path):
    pair = load_model_pair(*tiny_pair_paths, dtype="bf16")
    assert pair.base.dtype == pair.chat.dtype == torch.bfloat16
    base, chat = ResidualExtractor(pair, 0)(*_batch(pair))
    assert base.dtype == chat.dtype == torch.bfloat16
    with pytest.raises(CrossdiffError, match=r"^base model '.*nowhere': no such folder"):
        load_model_pair(tmp_path / "nowhere", tiny_pair_paths[1])


def test_parse_dtype_and_device():
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype("fp16") is torch.float16
    assert parse_dtype(torch.float32) is torch.float32 and parse_dtype("torch.float32") is torch.float32
    with pytest.raises(CrossdiffError, match="unknown dtype 'float8'; use one of: float32"):
        parse_dtype("float8")
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(CrossdiffError, match="unknown device 'gpu0'"):
        parse_device("gpu0")
    if not torch.cuda.is_available():
        assert parse_device("auto") == torch.device("cpu")
        with pytest.raises(CrossdiffError, match="CUDA is not available"):
            parse_device("cuda")


def test_bundled_organism_pair():
    """The real small organism pair, once its weights are committed."""
    organism = pytest.importorskip("crossdiff.organism")
    try:
        paths = organism.paths()
    except Exception as err:  # weights not built yet
        pytest.skip(f"organism weights not available: {err}")
    if isinstance(paths, dict):
        base, chat = paths["base"], paths["chat"]
    elif hasattr(paths, "base"):
        base, chat = paths.base, paths.chat
    else:
        base, chat = paths
    if not (Path(base).exists() and Path(chat).exists()):
        pytest.skip("organism weights not built yet")
    pair = load_model_pair(base, chat, dtype="float32")
    layer = pair.n_layers // 2
    input_ids, attention_mask = _batch(pair, ["Hello, how are you?", "The sky is blue."])
    got, _ = ResidualExtractor(pair, layer)(input_ids, attention_mask)
    real = attention_mask.bool()
    expected = _hidden_states(pair.base, input_ids, attention_mask)[layer + 1]
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
