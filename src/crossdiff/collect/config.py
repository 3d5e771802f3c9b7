"""The options of `crossdiff collect` (a recipe's [collect] table): torch-free, so that
`crossdiff collect --help` builds its flags from them without loading torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from crossdiff import model_sources
from crossdiff.config import to_dict
from crossdiff.devices import DEFAULT_DEVICE
from crossdiff.texts import TextSourceConfig, recorded


@dataclass
class CollectConfig:
    """What to collect and where; a recipe's ``[collect]`` table."""

    base: str  # base model spec: hub id, folder, .gguf file, smollm2, or BASE::ADAPTER (docs/models-and-texts.md)
    chat: str  # chat model spec, as base (its tokenizer and chat template are used)
    layer: int  # residual stream after this decoder block (0-based)
    sources: list[TextSourceConfig]
    out: str  # cache folder
    max_len: int = 1024  # tokens per document (longer ones are truncated, never packed)
    batch_size: int = 8  # documents per forward pass
    max_tokens: int | dict[str, int] | None = None  # token budget per source (one number for all, or by name)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # storage precision
    model_dtype: str = "bfloat16"  # precision the models run in
    device: str = DEFAULT_DEVICE
    shard_tokens: int = 2**20  # tokens per shard (the last shard of each source is smaller)
    rank: int = 0  # this process's part, 0 <= rank < world_size
    world_size: int = 1
    bos: Literal["auto", "always", "never"] = "auto"
    """BOS at the start of documents (docs/models-and-texts.md): auto adds it to plain text when the
    tokenizer has one (even if it does not add it itself), always also to chat, never adds none."""
    holdout: float = 0.0
    """Fraction of every source's documents set aside for a held-out cache (chosen by document
    index, the same documents in every run); 0 keeps all."""
    part: Literal["train", "heldout"] = "train"
    """With ``holdout``: collect the documents kept for training, or the held-out ones."""

    def identity(self) -> dict[str, Any]:
        """The settings that determine the cache's contents (checked when resuming)."""
        data = to_dict(self)
        data["sources"] = [recorded(source) for source in self.sources]
        for volatile in ("out", "device", "rank"):
            data.pop(volatile)
        for key, default in (("bos", "auto"), ("holdout", 0.0), ("part", "train")):
            if data[key] == default:  # defaults: caches from before these settings existed resume unchanged
                data.pop(key)
        # Which weights exactly, where a name alone does not say: a GGUF file's or an adapter's sha256.
        # (A hub id or folder adds nothing, so caches of such pairs keep the settings they had.)
        weights = [model_sources.identity(spec) for spec in (self.base, self.chat)]
        if any(set(w) - {"spec", "model"} for w in weights):
            data["model_identities"] = weights
        return data
