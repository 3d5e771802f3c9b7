"""Dataclass configs that round-trip to JSON/TOML, with one-line errors for bad input.

Every stage describes its options as a dataclass. ``from_dict`` builds one from plain
data (a recipe file, a saved checkpoint config, CLI overrides) and rejects unknown keys
and ill-typed values with a message naming the key, so a typo never silently becomes a
default.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

from crossdiff.errors import CrossdiffError
from crossdiff.files import write_text_atomic

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "", source: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types raise CrossdiffError.

    ``where`` is the dotted path of ``data`` inside a larger config (for nested tables);
    ``source`` names the file it came from, prefixed to any error message.
    """
    if source is not None:
        try:
            return from_dict(cls, data, where)
        except CrossdiffError as err:
            raise CrossdiffError(f"{source}: {err}") from None
    if not isinstance(data, dict):
        raise CrossdiffError(f"{where or cls.__name__}: expected a table of options, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise CrossdiffError(f"unknown config key '{path}'{hint}; valid keys: {', '.join(sorted(fields))}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required key is missing
        raise CrossdiffError(f"{where or cls.__name__}: {err}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-data view of a dataclass (nested dataclasses become dicts)."""
    return dataclasses.asdict(obj)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, path)
            except CrossdiffError as err:
                errors.append(str(err))
        raise CrossdiffError(errors[0] if errors else f"config key '{path}' may not be null")
    if origin is typing.Literal:
        if value not in args:
            raise CrossdiffError(f"config key '{path}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise CrossdiffError(f"config key '{path}' must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise CrossdiffError(f"config key '{path}' must be a table, got {value!r}")
        return {k: _coerce(v, args[1] if args else Any, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, path)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CrossdiffError(f"config key '{path}' must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise CrossdiffError(f"config key '{path}' must be an integer, got {value!r}")
        return int(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise CrossdiffError(f"config key '{path}' must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise CrossdiffError(f"config key '{path}' must be a string, got {value!r}")
        return value
    return value


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON file into plain data, with a one-line error if it is malformed."""
    path = Path(path)
    if not path.is_file():
        raise CrossdiffError(f"config file not found: {path}")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(path.read_text())
        return json.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as err:
        raise CrossdiffError(f"cannot parse {path}: {err}") from None


def load_section(path: str | Path, section: str) -> dict[str, Any]:
    """The ``[section]`` table of a recipe file, or the whole file if it has no such table.

    One recipe can thus hold ``[collect]``, ``[train]`` and ``[analyze]`` tables, while a
    file written for a single stage may keep its keys at the top level.
    """
    data = load_file(path)
    table = data.get(section)
    return dict(table) if isinstance(table, dict) else data


def save_json(obj: Any, path: str | Path) -> None:
    """Write a config (or plain data) as JSON, atomically: a stage's settings file often marks it done."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    write_text_atomic(Path(path), json.dumps(data, indent=2, sort_keys=True) + "\n")


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` on top; nested tables (such as [train.data]) merge key by key."""
    merged = dict(base)
    for key, value in update.items():
        both_tables = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = merge(merged[key], value) if both_tables else value
    return merged


def apply_overrides(data: dict[str, Any], overrides: list[str],
                    parse: Callable[[str, str], Any] | None = None) -> dict[str, Any]:
    """``data`` with ``key=value`` overrides applied (``--set``); dotted keys reach nested tables.
    ``parse(key, raw)`` reads a value (crossdiff.cli_config reads it by the field's type); by
    default values parse as JSON where they can (numbers, booleans, lists, null), else stay strings."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CrossdiffError(f"--set expects key=value, got {item!r}")
        set_path(data, key, parse(key, raw) if parse else _json_or_text(raw))
    return data


def set_path(data: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` of ``data`` (in place), making the nested tables it names."""
    node = data
    *parents, leaf = key.split(".")
    for parent in parents:
        node = node.setdefault(parent, {})
        if not isinstance(node, dict):
            raise CrossdiffError(f"--set {key}: '{parent}' is not a table")
    node[leaf] = value


def _json_or_text(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw  # a bare string such as activation=relu
