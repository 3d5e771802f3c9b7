"""Lazy package exports, so that naming a stage costs nothing until its code is used.

`crossdiff --help` and `crossdiff <stage> --help` import each stage's package; if a
package's ``__init__`` imported its implementation, the help would pay for torch and
transformers (seconds). A package instead lists what it exports and where it lives, and
the module is imported on first attribute access (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``names`` maps each public name to its module."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(names[name]), name)

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
