"""Read crosscoders saved in the dictionary_learning layout (the paper's published ones).

That layout (science-of-finetuning's dictionary_learning fork) stores

    encoder.weight [n, d, D]   encoder.bias [D]
    decoder.weight [n, D, d]   decoder.bias [n, d]
    code_normalization_id      (enum value, see below)
    k, threshold               (BatchTopK crosscoders only)
    activation_mean [n, d], activation_std [n, d], activation_global_scale [n], target_rms
                               (newer versions: the input normaliser; NaN when unused)
    _partition_config          (dfc_learning's dedicated feature crosscoders only: a dict
                               {dict_size, model_a_exclusive_pct, model_b_exclusive_pct})

The encoder applies ReLU to the joint pre-activation exactly as crossdiff does, so the
weights convert by transposing the decoder and nothing else. The normaliser maps an input
x to ``(x - activation_mean) * activation_global_scale`` per model before encoding, and a
reconstruction y back to ``y / (activation_global_scale + 1e-8) + activation_mean``; it
becomes crossdiff's input transform (``input_shift``, ``input_scale``,
``denormalize_epsilon``), so encodings and reconstructions are the same numbers. A DFC's
partition becomes ``dfc_partition`` (model A of dfc_learning is the base, model 0).

This module only translates: it returns CrossCoderConfig keywords and crossdiff tensors,
and crossdiff.crosscoder builds the model (so this module never imports it).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from crossdiff.errors import CrossdiffError, first_line
from crossdiff.files import load_tensors
from crossdiff.partition import partition_of_dictionary_learning

# dictionary_learning's CodeNormalization enum uses auto() from 1, in this order.
CODE_NORMALIZATION_BY_ID = {1: "crosscoder", 2: "sae", 3: "mixed", 4: "none"}
_DECOUPLED_ID = 5
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
FINAL_NAME = "model_final.pt"  # what dictionary_learning's trainSAE writes at the end
_STEP_NAME = re.compile(r"^checkpoint_(\d+)\.pt$")  # ... and every save_steps steps (checkpoint_0 = untrained)
_NOT_WEIGHTS = re.compile(r"^(eval_logs_\d+|last_eval_logs)\.pt$")  # evaluation logs saved beside them
NORMALISER_KEYS = ("activation_mean", "activation_std", "activation_global_scale", "target_rms")
NORMALISER_EPSILON = 1e-8  # dictionary_learning's denormalize divides by (global_scale + 1e-8)
PARTITION_KEY = "_partition_config"  # dfc_learning's state_dict() adds the DFC partition (plain data)


@dataclass
class Imported:
    config: dict[str, Any]
    """Keyword arguments of CrossCoderConfig."""
    tensors: dict[str, Tensor]
    """The crosscoder's state dict (float32)."""
    source: str
    """The file read."""


def read_dictionary_learning(path: Path, hub_config: dict[str, Any] | None = None) -> Imported:
    """Read a dictionary_learning crosscoder from a weights file or a training/hub folder."""
    path = Path(path)
    file = path if path.is_file() else choose_weights_file(path)
    return convert_dictionary_learning(_read_state_dict(file), hub_config or {}, source=str(file))


def choose_weights_file(folder: Path) -> Path:
    """The weights of a dictionary_learning folder: ``model_final.pt`` if present, else the
    highest ``checkpoint_N.pt``, else the only weights file; ambiguity is an error."""
    names = sorted(
        p.name for p in folder.iterdir()
        if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) and not _NOT_WEIGHTS.match(p.name)
    ) if folder.is_dir() else []
    if not names:
        raise CrossdiffError(f"{folder} holds no crosscoder weights (no config.json of crossdiff, no .safetensors/.pt file)")
    steps = {name: int(m.group(1)) for name in names if (m := _STEP_NAME.match(name))}
    others = [name for name in names if name not in steps]
    if FINAL_NAME in names:
        chosen = FINAL_NAME
    elif len(others) == 1 and not steps:
        chosen = others[0]
    elif steps and not others:
        chosen = max(steps, key=steps.get)
    else:
        raise CrossdiffError(
            f"{folder} holds several crosscoder weight files ({', '.join(names)}) and none is {FINAL_NAME}; "
            "pass the file to load"
        )
    if len(names) > 1:
        print(f"crossdiff: importing {folder / chosen} (of {len(names)} weight files there)", file=sys.stderr)
    return folder / chosen


def convert_dictionary_learning(state: dict[str, Any], hub_config: dict[str, Any], source: str = "checkpoint") -> Imported:
    # torch.compile'd models save parameters under an `_orig_mod.` prefix.
    state = {key.split("_orig_mod.")[-1]: value for key, value in state.items()}
    partition_config = state.pop(PARTITION_KEY, None)
    required = ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"]
    missing = [key for key in required if key not in state]
    if missing:
        raise CrossdiffError(f"{source} is not a crosscoder checkpoint: missing {missing}")

    W_enc = state["encoder.weight"]
    if W_enc.dim() != 3:
        raise CrossdiffError(f"{source}: encoder.weight has shape {tuple(W_enc.shape)}, expected [n_models, d, D]")
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
    threshold = float(state["threshold"]) if "threshold" in state else -1.0
    config = {
        "d_in": d_in,
        "d_sae": d_sae,
        "n_models": n_models,
        "activation": "batchtopk" if is_batchtopk else "relu",
        "k": int(state["k"]) if is_batchtopk else None,
        "code_normalization": name,
        "code_normalization_alpha_sae": _config_float(hub_config, "code_normalization_alpha_sae", 1.0),
        "code_normalization_alpha_cc": _config_float(hub_config, "code_normalization_alpha_cc", 0.1),
        "threshold": threshold,
        "metadata": {"imported_from": source, "original_format": "dictionary_learning"},
        **_input_transform(state, n_models, d_in, source),
    }
    if partition_config is not None:
        config["dfc_partition"] = partition_of_dictionary_learning(partition_config, d_sae, source)
        config["metadata"]["original_format"] = "dfc_learning"
    tensors = {
        "W_enc": W_enc,
        "b_enc": state["encoder.bias"],
        "W_dec": state["decoder.weight"].permute(1, 0, 2),
        "b_dec": state["decoder.bias"],
        "threshold": torch.tensor(threshold),
        "input_scale": torch.tensor(config["input_scale"]) if config.get("input_scale") else torch.ones(n_models),
    }
    return Imported(config, {k: v.float().contiguous() for k, v in tensors.items()}, source)


def _input_transform(state: dict[str, Tensor], n_models: int, d_in: int, source: str) -> dict[str, Any]:
    """CrossCoderConfig keywords reproducing dictionary_learning's activation normaliser (none if unused)."""
    present = [key for key in NORMALISER_KEYS if key in state]
    if not present:
        return {}
    if len(present) != len(NORMALISER_KEYS):
        absent = [key for key in NORMALISER_KEYS if key not in state]
        raise CrossdiffError(f"{source} has an incomplete activation normaliser (lacks {', '.join(absent)})")
    mean, std = state["activation_mean"].float(), state["activation_std"].float()
    scale = state["activation_global_scale"].float()
    # dictionary_learning registers NaN buffers when no normaliser was used: identity.
    if bool(torch.isnan(mean).any()) or bool(torch.isnan(std).any()):
        return {}
    if tuple(mean.shape) != (n_models, d_in) or tuple(scale.shape) != (n_models,):
        raise CrossdiffError(
            f"{source}: activation normaliser of shape mean {tuple(mean.shape)}, global scale {tuple(scale.shape)}; "
            f"expected {(n_models, d_in)} and {(n_models,)}"
        )
    if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(scale).all()) and bool((scale > 0).all())):
        raise CrossdiffError(f"{source}: the activation normaliser holds non-finite or non-positive values")
    return {
        "input_shift": [[float(v) for v in row] for row in mean],
        "input_scale": [float(v) for v in scale],
        "denormalize_epsilon": NORMALISER_EPSILON,
    }


def _config_float(config: dict[str, Any], key: str, default: float) -> float:
    """A number from the hub config, with dictionary_learning's default when absent or null."""
    value = config.get(key)
    return default if value is None else float(value)


def _read_state_dict(file: Path) -> dict[str, Tensor]:
    if file.suffix == ".safetensors":
        try:
            return load_file(str(file))
        except PermissionError:
            raise CrossdiffError(f"cannot read {file}: permission denied") from None
        except Exception as err:  # truncated or foreign files
            raise CrossdiffError(f"cannot read {file}: {first_line(err)}") from None
    state = load_tensors(file)  # a pickle that would run code is refused
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for k, v in state.items() if not k.endswith(PARTITION_KEY)):
        raise CrossdiffError(f"{file} is not a state dict of tensors")
    return state
