"""Import crosscoders saved in the dictionary_learning layout (the paper's published ones).

That layout (science-of-finetuning's dictionary_learning fork) stores

    encoder.weight [n, d, D]   encoder.bias [D]
    decoder.weight [n, D, d]   decoder.bias [n, d]
    code_normalization_id      (enum value, see below)
    k, threshold               (BatchTopK crosscoders only)

and the encoder applies ReLU to the joint pre-activation exactly as crossdiff does, so the
conversion is a transpose of the decoder and nothing else: encode and decode outputs are
identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crossdiff.errors import CrossdiffError

# dictionary_learning's CodeNormalization enum uses auto() from 1, in this order.
CODE_NORMALIZATION_BY_ID = {1: "crosscoder", 2: "sae", 3: "mixed", 4: "none"}
_DECOUPLED_ID = 5


def load_dictionary_learning(folder: Path, hub_config: dict[str, Any] | None = None):
    """Build a CrossCoder from a dictionary_learning checkpoint folder."""
    state = _read_state_dict(folder)
    return convert_dictionary_learning(state, hub_config or {}, source=str(folder))


def convert_dictionary_learning(state: dict[str, Tensor], hub_config: dict[str, Any], source: str = "checkpoint"):
    from crossdiff.crosscoder import CrossCoder, CrossCoderConfig

    # torch.compile'd models save parameters under an `_orig_mod.` prefix.
    state = {key.split("_orig_mod.")[-1]: value for key, value in state.items()}
    required = ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"]
    missing = [key for key in required if key not in state]
    if missing:
        raise CrossdiffError(f"{source} is not a crosscoder checkpoint: missing {missing}")

    W_enc = state["encoder.weight"]
    n_models, d_in, d_sae = W_enc.shape
    if tuple(state["decoder.weight"].shape) != (n_models, d_sae, d_in):
        raise CrossdiffError(
            f"{source}: decoder.weight has shape {tuple(state['decoder.weight'].shape)}, "
            f"expected {(n_models, d_sae, d_in)} from encoder.weight"
        )

    norm_id = int(state["code_normalization_id"]) if "code_normalization_id" in state else None
    if norm_id is None:  # older checkpoints predate the buffer; the hub config may name it
        name = str(hub_config.get("code_normalization", "crosscoder")).lower()
    elif norm_id == _DECOUPLED_ID:
        raise CrossdiffError(f"{source} uses DECOUPLED code normalisation, which crossdiff does not support")
    elif norm_id not in CODE_NORMALIZATION_BY_ID:
        raise CrossdiffError(f"{source}: unknown code_normalization_id {norm_id}")
    else:
        name = CODE_NORMALIZATION_BY_ID[norm_id]

    is_batchtopk = "k" in state
    config = CrossCoderConfig(
        d_in=d_in,
        d_sae=d_sae,
        n_models=n_models,
        activation="batchtopk" if is_batchtopk else "relu",
        k=int(state["k"]) if is_batchtopk else None,
        code_normalization=name,
        code_normalization_alpha_sae=_config_float(hub_config, "code_normalization_alpha_sae", 1.0),
        code_normalization_alpha_cc=_config_float(hub_config, "code_normalization_alpha_cc", 0.1),
        threshold=float(state["threshold"]) if "threshold" in state else -1.0,
        metadata={"imported_from": source, "original_format": "dictionary_learning"},
    )
    model = CrossCoder(config)
    converted = {
        "W_enc": W_enc,
        "b_enc": state["encoder.bias"],
        "W_dec": state["decoder.weight"].permute(1, 0, 2),
        "b_dec": state["decoder.bias"],
        "threshold": torch.tensor(config.threshold),
        "input_scale": torch.ones(n_models),
    }
    model.load_checked_state_dict({k: v.float().contiguous() for k, v in converted.items()}, source=source)
    return model


def _config_float(config: dict[str, Any], key: str, default: float) -> float:
    """A number from the hub config, with dictionary_learning's default when absent or null."""
    value = config.get(key)
    return default if value is None else float(value)


def _read_state_dict(folder: Path) -> dict[str, Tensor]:
    safetensors_files = sorted(folder.glob("*.safetensors"))
    torch_files = sorted([*folder.glob("*.pt"), *folder.glob("*.pth"), *folder.glob("*.bin")])
    if safetensors_files:
        from safetensors.torch import load_file

        return load_file(str(safetensors_files[0]))
    if torch_files:
        return torch.load(torch_files[0], map_location="cpu", weights_only=True)
    raise CrossdiffError(f"{folder} holds no crosscoder weights (no config.json of crossdiff, no .safetensors/.pt file)")
