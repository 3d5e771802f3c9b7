"""Back-of-the-envelope costs for `crossdiff run --dry-run`: disk, memory and time per stage.

Nothing here loads a model. Shapes come from, in order: a local model folder's
config.json, the Hugging Face cache (offline), the recipe's ``[models."ID"]`` table, or
:data:`KNOWN_MODELS`; the plan says which one it used. Time is FLOPs divided by an
assumed sustained throughput (:data:`HARDWARE` peak x :data:`UTILISATION`), so it is an
order of magnitude, not a promise; every assumption is printed with the plan.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossdiff import model_sources
from crossdiff.errors import CrossdiffError

# config.json keys of the models the bundled recipes use (checked against their hub configs).
_GEMMA2_2B = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=256, vocab_size=256000, tie_word_embeddings=True)
_SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True)
_QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2, head_dim=64, vocab_size=151936, tie_word_embeddings=True)
_LLAMA31_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False)
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "google/gemma-2-2b": _GEMMA2_2B, "google/gemma-2-2b-it": _GEMMA2_2B,
    "HuggingFaceTB/SmolLM2-135M": _SMOLLM2_135M, "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_135M,
    "Qwen/Qwen2.5-0.5B": _QWEN25_05B, "Qwen/Qwen2.5-0.5B-Instruct": _QWEN25_05B,
    "meta-llama/Llama-3.1-8B": _LLAMA31_8B, "meta-llama/Llama-3.1-8B-Instruct": _LLAMA31_8B,
}

# Dense bf16 peak TFLOP/s and memory (GiB) per device; "cpu" is two to four cores in fp32
# (calibrated on the organism recipe: ~1.5 minutes on 2 idle cores).
HARDWARE: dict[str, tuple[float, float]] = {
    "cpu": (0.2, 16), "T4": (65, 16), "L4": (121, 24), "A10G": (70, 24), "RTX4090": (165, 24),
    "A100": (312, 80), "H100": (989, 80), "H200": (989, 141),
}
UTILISATION = {"forward": 0.35, "crosscoder": 0.25}
DISK_BYTES_PER_S = {"write": 500e6, "read": 2e9}  # sustained, per machine (a local NVMe SSD, conservatively)
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
TOKEN_RECORD_BYTES = 27  # crossdiff.cache.store.TOKEN_DTYPE


@dataclass
class ModelShape:
    name: str
    d_model: int
    n_layers: int
    params: int  # all parameters (embeddings included)
    block_params: int  # parameters of one decoder block
    source: str  # where the shape came from

    @classmethod
    def from_config(cls, name: str, config: dict[str, Any], source: str) -> ModelShape:
        config = config.get("text_config", config)
        try:
            d, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
            heads = config["num_attention_heads"]
            kv = config.get("num_key_value_heads") or heads
            head_dim = config.get("head_dim") or d // heads
            vocab = config["vocab_size"]
        except KeyError as err:
            raise CrossdiffError(f"model shape of {name} ({source}) lacks {err.args[0]!r}") from None
        block = d * heads * head_dim * 2 + d * kv * head_dim * 2 + 3 * d * inter
        embeddings = vocab * d * (1 if config.get("tie_word_embeddings", True) else 2)
        return cls(name, d, layers, layers * block + embeddings, block, source)


def model_shape(name: str, recipe_models: dict[str, dict[str, Any]]) -> ModelShape:
    """Shape of model ``name`` (a model spec) without loading it (see the module docstring for
    the order). An adapter changes no shape, so ``BASE::ADAPTER`` has BASE's."""
    spec = model_sources.parse(name)
    name = model_sources.SMOLLM2_HUB_ID if spec.model == model_sources.SMOLLM2 else spec.model
    local = Path(name) / "config.json"
    if local.is_file():
        return ModelShape.from_config(name, json.loads(local.read_text()), "its config.json")
    cached = _hub_cached_config(name)
    if cached is not None:
        return ModelShape.from_config(name, cached, "the Hugging Face cache")
    if name in recipe_models:
        return ModelShape.from_config(name, recipe_models[name], "the recipe's [models] table")
    if name in KNOWN_MODELS:
        return ModelShape.from_config(name, KNOWN_MODELS[name], "crossdiff's table of known models (hub unreachable)")
    raise CrossdiffError(
        f"cannot tell the shape of {name!r} offline: add a [models.\"{name}\"] table with hidden_size, "
        "intermediate_size, num_hidden_layers, num_attention_heads, vocab_size"
    )


def _hub_cached_config(name: str) -> dict[str, Any] | None:
    try:
        from huggingface_hub import try_to_load_from_cache  # deferred: about 0.1 s to import; `crossdiff run --help` imports this module

        path = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a repo id, or no hub library: fall through to the tables
        return None
    return json.loads(Path(path).read_text()) if isinstance(path, str) else None


@dataclass
class Hardware:
    kind: str
    count: int
    tflops: float  # peak per device
    memory_gib: float  # per device

    @classmethod
    def parse(cls, text: str) -> Hardware:
        match = re.fullmatch(r"(?:(\d+)\s*x\s*)?([A-Za-z0-9]+)", text.strip())
        kinds = {k.lower(): k for k in HARDWARE}
        if not match or match.group(2).lower() not in kinds:
            raise CrossdiffError(f"hardware {text!r}: expected cpu or NxGPU with GPU one of {', '.join(HARDWARE)}, e.g. 8xH100")
        kind = kinds[match.group(2).lower()]
        count = int(match.group(1) or 1)
        if count < 1:
            raise CrossdiffError(f"hardware {text!r}: the device count must be positive")
        return cls(kind, count, *HARDWARE[kind])

    def __str__(self) -> str:
        return "CPU" if self.kind == "cpu" else f"{self.count} x {self.kind}"

    def seconds(self, flops: float, work: str, devices: int | None = None) -> float:
        return flops / (self.tflops * 1e12 * UTILISATION[work] * (devices or self.count))


@dataclass
class Cost:
    disk: float = 0.0  # bytes written
    memory: float = 0.0  # peak bytes per device (GPU memory, or RAM on a CPU)
    host_memory: float = 0.0  # peak host RAM beyond the models (e.g. a shuffle buffer)
    seconds: float = 0.0


def forward_flops_per_token(shape: ModelShape, layer: int, mean_len: float) -> float:
    """Both-model forward up to block ``layer`` (collect stops there): 2 x params + attention."""
    blocks = layer + 1
    return 2 * (2 * shape.block_params * blocks + 4 * mean_len * shape.d_model * blocks)


def crosscoder_params(d_model: int, d_sae: int) -> int:
    return 4 * d_model * d_sae + d_sae + 2 * d_model


def training_step_flops(d_model: int, d_sae: int, batch: int) -> float:
    """Dense forward (encode 2d->D, decode D->2d) and backward (twice the forward)."""
    return 3 * (2 * batch * 2 * d_model * d_sae * 2)


def training_memory(d_model: int, d_sae: int, batch: int) -> float:
    """Weights, gradients and two Adam moments in fp32, plus a few [B, D] and [B, 2, d] buffers."""
    return 16 * crosscoder_params(d_model, d_sae) + 4 * batch * (4 * d_sae + 8 * d_model)


def model_memory(shape: ModelShape, model_dtype: str, batch_docs: int, max_len: int) -> float:
    """Both models' weights plus one forward's activations (a rough 16 d per token per block)."""
    weights = 2 * shape.params * BYTES.get(model_dtype, 4)
    return weights + batch_docs * max_len * shape.d_model * 16 * BYTES.get(model_dtype, 4)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def human_seconds(s: float) -> str:
    if s < 90:
        return f"{max(s, 0.1):.0f} s" if s >= 1 else "< 1 s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def ceil_div(a: int, b: int) -> int:
    return math.ceil(a / b)
