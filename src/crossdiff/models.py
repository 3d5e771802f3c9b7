"""A base/chat model pair and the residual stream after one decoder block of each.

``load_model_pair`` loads any two transformers causal LMs (model specs: hub id, folder, GGUF
file, or any of those plus a LoRA adapter; see ``model_sources``) and
refuses pairs that cannot be diffed: a crosscoder compares the two models token by
token, so both must see the same token ids (same tokenizer behaviour) and write
residual vectors of the same width. ``ResidualExtractor`` reads the residual stream
after block L with a forward hook on that block and stops the forward right there, so
later blocks and the LM head never run.

The hook works on any architecture whose decoder blocks live in an ``nn.ModuleList``
(Llama, Gemma 2/3, Qwen 2/3, Mistral, GPT-2, GPT-NeoX, ...): no conversion step, and the
same code path for base and chat.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crossdiff import model_sources
from crossdiff.devices import parse_device
from crossdiff.errors import CrossdiffError, first_line
from crossdiff.texts import render_chat

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}

# Where popular architectures keep their decoder blocks; anything else is found by search.
_KNOWN_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Gemma 1/2/3 (text), Qwen 2/3, Phi-3, OLMo, ...
    "model.language_model.layers",  # Gemma 3 / multimodal wrappers
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "model.decoder.layers",  # OPT
)

# Strings that probe the corners where tokenizers tend to disagree.
PROBE_TEXTS = (
    "Hello world! This is a tokenizer probe.",
    "  leading spaces, trailing spaces  ",
    "line one\nline two\n\nparagraph\ttab",
    "Numbers 0 1 12 123 1234 3.14159 -7 1e-5",
    "Unicode: café naïve 東京 Привет 🙂",
    "def f(x):\n    return x ** 2  # code",
)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"``, ``"bf16"``, ``"float32"``, ... or a torch dtype -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise CrossdiffError(f"unknown dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
    return DTYPES[key]


@dataclass
class ModelPair:
    """Two causal LMs to diff (m=0 base, m=1 chat) and the tokenizer both are fed with."""

    base: Any  # transformers PreTrainedModel
    chat: Any
    tokenizer: Any  # the CHAT tokenizer: it holds the chat template; base sees the same ids
    base_name: str
    chat_name: str
    d_model: int
    n_layers: int
    base_tokenizer: Any = None  # kept so later texts can be checked with check_same_tokenization
    identities: tuple[dict, dict] | None = None
    """model_sources.identity of each spec: GGUF and adapter sha256s, for the run's records."""

    @property
    def device(self) -> torch.device:
        return next(self.chat.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.chat.parameters()).dtype


def load_model_pair(
    base: str | Path,
    chat: str | Path,
    *,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device = "cpu",
    check_texts: Sequence[str] = (),
) -> ModelPair:
    """Load base and chat models (hub ids or local folders) and check that they can be diffed.

    Raises CrossdiffError, one line saying what differs, if the residual widths, the
    number of decoder blocks, the vocabularies or the tokenization of ``PROBE_TEXTS`` plus
    ``check_texts`` (plus a probe conversation when the chat tokenizer has a template)
    differ.
    """
    torch_dtype, torch_device = parse_dtype(dtype), parse_device(device)
    base_name, chat_name = str(base), str(chat)
    # GGUF files are converted once, adapter folders checked, missing paths named: before anything loads.
    (base_weights, base_adapter), (chat_weights, chat_adapter) = (
        model_sources.resolve(name, role) for name, role in ((base_name, "base"), (chat_name, "chat"))
    )

    # Cheap checks first: configs and tokenizers, before gigabytes of weights are loaded.
    d_model = _same_width(base_weights, chat_weights)
    base_tokenizer, chat_tokenizer = _same_tokenizers(base_weights, chat_weights, check_texts)
    base_model = load_model(base_name, "base", torch_dtype, torch_device, resolved=(base_weights, base_adapter))
    chat_model = load_model(chat_name, "chat", torch_dtype, torch_device, resolved=(chat_weights, chat_adapter))
    return ModelPair(
        base=base_model,
        chat=chat_model,
        tokenizer=chat_tokenizer,
        base_name=base_name,
        chat_name=chat_name,
        d_model=d_model,
        n_layers=_same_blocks(base_model, chat_model, len(chat_tokenizer)),
        base_tokenizer=base_tokenizer,
        identities=(model_sources.identity(base_name), model_sources.identity(chat_name)),
    )


def _same_width(base_weights: str, chat_weights: str) -> int:
    """The residual width both models' configs give (or CrossdiffError if they differ)."""
    d_base, d_chat = (
        _text_config(_load_config(name, role)).hidden_size for name, role in ((base_weights, "base"), (chat_weights, "chat"))
    )
    if d_base != d_chat:
        raise CrossdiffError(f"residual widths differ: base {d_base}, chat {d_chat}")
    return int(d_chat)


def _same_tokenizers(base_weights: str, chat_weights: str, check_texts: Sequence[str]) -> tuple[Any, Any]:
    """(base, chat) tokenizers, checked to share a vocabulary and to encode the probe texts,
    ``check_texts`` and a probe conversation alike."""
    chat_tokenizer = _load_tokenizer(chat_weights, "chat")
    try:
        base_tokenizer = _load_tokenizer(base_weights, "base")
    except CrossdiffError:
        # Some base checkpoints ship weights only; the chat tokenizer is what both models see anyway.
        base_tokenizer = chat_tokenizer
    _check_same_vocabulary(base_tokenizer, chat_tokenizer)
    probes = list(PROBE_TEXTS) + list(check_texts)
    if getattr(chat_tokenizer, "chat_template", None):
        try:
            probes.append(render_chat(chat_tokenizer, [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello!"}]))
        except CrossdiffError:
            pass  # an unusual template that wants other turns; the chat sources are checked when collected
    check_same_tokenization((base_tokenizer, chat_tokenizer), probes)
    return base_tokenizer, chat_tokenizer


def _same_blocks(base_model: nn.Module, chat_model: nn.Module, vocabulary: int) -> int:
    """The number of decoder blocks of both loaded models, each embedding the whole ``vocabulary``."""
    n_base, n_chat = len(decoder_layers(base_model)), len(decoder_layers(chat_model))
    if n_base != n_chat:
        raise CrossdiffError(f"numbers of decoder blocks differ: base {n_base}, chat {n_chat}")
    for role, model in (("base", base_model), ("chat", chat_model)):
        rows = model.get_input_embeddings().num_embeddings
        if rows < vocabulary:
            raise CrossdiffError(
                f"vocabularies differ: the tokenizer has {vocabulary} tokens but the {role} model embeds only {rows}"
            )
    return n_chat


def check_same_tokenization(pair_or_tokenizers: ModelPair | tuple[Any, Any], texts: Iterable[Any]) -> None:
    """Raise CrossdiffError naming the first text that the two tokenizers encode differently.

    ``texts`` holds strings or objects with a ``text`` attribute (e.g. TokenizedDoc). Both
    encodings are compared, with and without the tokenizer's special tokens (BOS).
    """
    if isinstance(pair_or_tokenizers, ModelPair):
        base_tok = pair_or_tokenizers.base_tokenizer or pair_or_tokenizers.tokenizer
        chat_tok = pair_or_tokenizers.tokenizer
    else:
        base_tok, chat_tok = pair_or_tokenizers
    if base_tok is chat_tok:
        return
    for text in texts:
        text = getattr(text, "text", text)
        for special in (True, False):
            base_ids = base_tok(text, add_special_tokens=special, verbose=False)["input_ids"]
            chat_ids = chat_tok(text, add_special_tokens=special, verbose=False)["input_ids"]
            if base_ids != chat_ids:
                where = next((i for i, (a, b) in enumerate(zip(base_ids, chat_ids)) if a != b), min(len(base_ids), len(chat_ids)))
                preview = text[:60].replace("\n", "\\n")
                raise CrossdiffError(
                    f"tokenizers differ on text {preview!r}{'...' if len(text) > 60 else ''}: "
                    f"base gives {len(base_ids)} tokens, chat {len(chat_ids)}, first difference at token {where}"
                )


def residual_width(model: nn.Module) -> int:
    """Width d of the residual stream (hidden size of the text model)."""
    return int(_text_config(model.config).hidden_size)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList holding the decoder blocks, for any architecture that has one."""
    n_layers = getattr(_text_config(model.config), "num_hidden_layers", None)
    for path in _KNOWN_LAYER_PATHS:
        module = _get_submodule(model, path)
        if isinstance(module, nn.ModuleList) and (n_layers is None or len(module) == n_layers):
            return module
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and "vision" not in name
    ]
    if not candidates:
        raise CrossdiffError(
            f"cannot find the decoder blocks of {type(model).__name__}: no nn.ModuleList of length {n_layers}"
        )
    return candidates[0][1]


def _text_config(config: Any) -> Any:
    # Multimodal wrappers (Gemma 3) keep the language model's settings in a sub-config.
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def context_length(*models: Any) -> int | None:
    """The most positions every one of ``models`` was built for (``max_position_embeddings``
    or ``n_positions``), or None if none says."""
    limits = []
    for model in models:
        config = _text_config(model.config)
        limit = next((getattr(config, key) for key in ("max_position_embeddings", "n_positions")
                      if isinstance(getattr(config, key, None), int) and getattr(config, key) > 0), None)
        if limit is not None:
            limits.append(limit)
    return min(limits) if limits else None


def pad_batch(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``(input_ids, attention_mask)``, both int64 [B, T]."""
    if not sequences:
        raise ValueError("pad_batch needs at least one sequence")
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


class _StopForward(Exception):
    """Raised by the capture hook: everything after the chosen block is wasted work."""


class ResidualExtractor:
    """Residual stream after decoder block ``layer`` for both models, with early exit.

    ``layer`` is 0-based: the output of block L equals ``hidden_states[L + 1]`` of
    ``output_hidden_states=True`` (``hidden_states[0]`` is the embedding output). For the
    last block, transformers applies the final norm to ``hidden_states[-1]``; this
    extractor always returns the raw block output.

    Inputs must be right-padded (``pad_batch``); rows at padded positions of the result
    are meaningless and must be dropped with ``attention_mask``.
    """

    def __init__(self, pair: ModelPair, layer: int):
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < pair.n_layers:
            raise CrossdiffError(
                f"layer {layer!r} out of range: the models have {pair.n_layers} decoder blocks (valid layers 0..{pair.n_layers - 1})"
            )
        self.pair = pair
        self.layer = layer
        self._blocks = (decoder_layers(pair.base)[layer], decoder_layers(pair.chat)[layer])

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(base, chat)`` activations, each [B, T, d] in the models' dtype and device."""
        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be [B, T]")
        # A left-padded row would shift positions and silently change the activations.
        if not torch.equal(attention_mask.cumprod(dim=1), attention_mask.long()):
            raise ValueError("attention_mask must be right-padded (ones, then zeros in every row)")
        base = _run_until(self.pair.base, self._blocks[0], input_ids, attention_mask)
        chat = _run_until(self.pair.chat, self._blocks[1], input_ids, attention_mask)
        return base, chat


def residual_after_block(model: nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Residual stream [B, T, d] after decoder block ``layer`` of one model; blocks after it never run."""
    return _run_until(model, decoder_layers(model)[layer], input_ids, attention_mask)


def _run_until(model: nn.Module, block: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    captured: list[torch.Tensor] = []

    def capture(module: nn.Module, args: Any, output: Any) -> None:
        # transformers 5 blocks return a tensor; older versions return (hidden, ...) tuples.
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    device = next(model.parameters()).device
    handle = block.register_forward_hook(capture)
    try:
        with torch.inference_mode():
            model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"decoder block of {type(model).__name__} never ran; cannot read its residual stream")
    return captured[0]


def _get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    module: Any = model
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _load_config(name: str, role: str) -> Any:
    # deferred: transformers takes seconds to import; the report imports this module (through analysis.concepts) and loads no model
    from transformers import AutoConfig

    problem = model_sources.missing_path_problem(name, f"{role} model")
    if problem:  # transformers would report a failed hub lookup instead
        raise CrossdiffError(problem)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=False)
    except Exception as err:  # OSError, ValueError, HF hub errors: all mean "cannot load"
        raise _cannot_load(f"{role} model", name, err) from None


def _load_tokenizer(name: str, role: str) -> Any:
    from transformers import AutoTokenizer  # deferred: as in _load_config

    problem = model_sources.missing_path_problem(name, f"{role} tokenizer")
    if problem:
        raise CrossdiffError(problem)
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except Exception as err:  # OSError, ValueError, HF hub errors: all mean "cannot load"
        raise _cannot_load(f"{role} tokenizer", name, err) from None


def load_model(
    spec: str | Path,
    role: str = "model",
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    *,
    resolved: tuple[str, str | None] | None = None,
) -> nn.Module:
    """One causal LM from a model spec (hub id, folder, GGUF, ``BASE::ADAPTER``; see
    model_sources), in eval mode without gradients. An adapter is merged into the weights.

    Remote code never runs: ``trust_remote_code`` stays False (as for every config and
    tokenizer crossdiff loads), so a model that ships its own code is refused in one line."""
    # deferred: as in _load_config
    import transformers
    from transformers import AutoModelForCausalLM

    weights, adapter = resolved or model_sources.resolve(str(spec), role)
    # transformers renamed torch_dtype to dtype in 4.56.
    dtype_kw = "dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
    try:
        model = AutoModelForCausalLM.from_pretrained(weights, trust_remote_code=False, **{dtype_kw: parse_dtype(dtype)})
    except Exception as err:
        raise _cannot_load(f"{role} model", str(spec), err) from None
    if adapter is not None:
        model = model_sources.merge_adapter(model, adapter, role)
    model.to(parse_device(device)).eval().requires_grad_(False)
    return model


def load_tokenizer_of(spec: str | Path, role: str = "model") -> Any:
    """The tokenizer of a model spec (an adapter keeps its base model's tokenizer)."""
    weights, _ = model_sources.resolve(str(spec), role)
    return _load_tokenizer(weights, role)


def _cannot_load(what: str, name: str, err: Exception) -> CrossdiffError:
    message = f"cannot load the {what} from {name!r}: {first_line(err)}"
    if "custom code" in str(err) or "trust_remote_code" in str(err):
        message += " (crossdiff never runs code shipped with a model: use one whose architecture transformers implements)"
    return CrossdiffError(message)


def _check_same_vocabulary(base_tok: Any, chat_tok: Any) -> None:
    if base_tok is chat_tok:
        return
    base_vocab, chat_vocab = base_tok.get_vocab(), chat_tok.get_vocab()
    if base_vocab == chat_vocab:
        return
    if len(base_vocab) != len(chat_vocab):
        raise CrossdiffError(f"vocabularies differ: base tokenizer has {len(base_vocab)} tokens, chat {len(chat_vocab)}")
    token = next(t for t in sorted(chat_vocab) if base_vocab.get(t) != chat_vocab[t])
    raise CrossdiffError(
        f"vocabularies differ: token {token!r} has id {base_vocab.get(token)} in base, {chat_vocab[token]} in chat"
    )


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)
