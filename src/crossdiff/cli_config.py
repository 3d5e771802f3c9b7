"""One CLI scheme for every stage, derived from its dataclass config (docs/architecture.md).

``add_config_flags(parser, Config)`` gives a stage's parser ``--config FILE``, ``--set
key=value`` (dotted keys reach nested tables) and one flag per field, nested fields too
(``--data.epochs``), with the field's docstring (or trailing comment) as help. A flag the
stage declared itself with ``dest`` = a field's dotted name (a positional, a short or older
spelling such as ``--latent`` for ``latents``) stands for that field, and no generated flag
is added over a name already taken. ``config_from_args`` builds the config: dataclass
defaults, then the file's ``[section]`` table, then flags, then ``--set``; ``from_dict``
checks the result (unknown keys with a typo hint, types, ranges).

Values are read by the field's type: strings stay strings, numbers and booleans parse as
JSON, a list field's flag may repeat (``--factors 0.5 --factors 1``) or take a JSON list,
and ``null`` clears an optional field.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import functools
import inspect
import io
import json
import textwrap
import tokenize
import types
import typing
from typing import Any, TypeVar

from crossdiff.config import apply_overrides, from_dict, load_section, merge, set_path
from crossdiff.errors import CrossdiffError

T = TypeVar("T")


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, config_help: str | None = None) -> None:
    """Add ``--config``, ``--set`` and a flag for every field of ``cls`` not already claimed.
    Call it after the stage's own arguments, so that their spellings win."""
    taken = parser._option_string_actions  # noqa: SLF001 (argparse has no public view of its flags)
    claimed = {action.dest for action in parser._actions}  # noqa: SLF001
    if "--config" not in taken:
        parser.add_argument("--config", metavar="FILE", help=config_help or "TOML or JSON file of these options "
                            "(keys at the top level or in the stage's table); flags and --set override it")
    if "--set" not in taken:
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="set any option, nested ones by dotted key (data.epochs=2); repeatable")
    group = parser.add_argument_group(f"options ({cls.__name__}; also --set KEY=VALUE or --config FILE)")
    for path, hint, default, doc in fields(cls):
        flag = "--" + path.replace("_", "-")
        if path in claimed or flag in taken:
            continue
        group.add_argument(flag, dest=path, default=argparse.SUPPRESS, help=_help(doc, default), **_kind(hint))


def config_from_args(cls: type[T], args: argparse.Namespace, section: str, *,
                     defaults: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> T:
    """``cls`` from ``defaults``, ``--config``'s ``[section]``, ``extra`` (values a stage
    derived from its own flags), the field flags and ``--set``, in that order."""
    data = config_data(cls, args, section, defaults=defaults, extra=extra)
    check_required(cls, data, section)
    return from_dict(cls, data)


def check_required(cls: type, data: dict[str, Any], command: str) -> None:
    """One line naming the flags of the required fields that neither flags nor the file gave."""
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and data.get(f.name) is None]
    if missing and not set(data) - {f.name for f in dataclasses.fields(cls)}:  # else from_dict names the typo
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise CrossdiffError(f"{command} needs {flags} (as flags, --set or in --config)")


def config_data(cls: type, args: argparse.Namespace, section: str, *,
                defaults: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plain data ``config_from_args`` checks: for stages that add keys before checking."""
    data = dict(defaults or {})
    if getattr(args, "config", None):
        data = merge(data, load_section(args.config, section))
    data = copy.deepcopy(merge(data, extra or {}))
    for path, *_ in fields(cls):
        if getattr(args, path, None) is not None:
            set_path(data, path, getattr(args, path))
    return apply_overrides(data, getattr(args, "set", None) or [], parse=functools.partial(parse_at, cls))


def fields(cls: type, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """(dotted name, type, default, help) of every field, nested dataclass fields flattened."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    found = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        path, hint = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(hint):
            found.extend(fields(hint, path + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        found.append((path, hint, default, docs.get(f.name, "")))
    return found


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring (the string right under it) or else its trailing comment."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        lines = source.splitlines()
        body = ast.parse(source).body[0].body
        for node, after in zip(body, [*body[1:], None]):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                docs[node.target.id] = " ".join(after.value.value.split())
            elif comment := _trailing_comment(lines[node.end_lineno - 1]):
                docs[node.target.id] = comment
    return docs


def _trailing_comment(line: str) -> str:
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
    except (tokenize.TokenError, SyntaxError):
        return ""
    return next((t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT), "")


def parse_value(raw: str, hint: Any) -> Any:
    """A command-line string as a value of type ``hint`` (checked later by from_dict)."""
    inner, optional = _unoptional(hint)
    if optional and raw in ("null", "none", "None"):
        return None
    if inner is str or (typing.get_origin(inner) is typing.Literal and all(isinstance(a, str) for a in typing.get_args(inner))):
        return raw
    if typing.get_origin(inner) in (list, tuple) and not raw.lstrip().startswith("["):
        item = (typing.get_args(inner) or (Any,))[0]
        return [parse_value(raw, item)]
    try:
        return json.loads(raw)
    except ValueError:
        return raw  # from_dict names the key and the type it wanted


def parse_at(cls: type, key: str, raw: str) -> Any:
    """``--set key=raw``: parsed by the type of field ``key`` (dotted) of ``cls``, where it has one."""
    hint: Any = cls
    for part in key.split("."):
        hint, _ = _unoptional(hint)
        if not dataclasses.is_dataclass(hint):
            hint = None
            break
        hint = typing.get_type_hints(hint).get(part)
    return parse_value(raw, Any if hint is None else hint)


def _unoptional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return hint, False


def _kind(hint: Any) -> dict[str, Any]:
    """The argparse keywords for a field of type ``hint``."""
    inner, _ = _unoptional(hint)
    if inner is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(inner) is typing.Literal:
        return {"choices": list(typing.get_args(inner)), "type": functools.partial(parse_value, hint=hint)}
    if typing.get_origin(inner) in (list, tuple):
        return {"action": "extend", "metavar": "VALUE", "type": functools.partial(parse_value, hint=inner)}
    metavar = {int: "N", float: "X", str: "TEXT"}.get(inner, "JSON")
    return {"metavar": metavar, "type": functools.partial(parse_value, hint=hint)}


def _help(doc: str, default: Any) -> str:
    if default is dataclasses.MISSING:
        tail = "required"
    else:
        tail = f"default: {json.dumps(default) if default is None or isinstance(default, bool) else default}"
    return f"{doc} ({tail})".strip().replace("%", "%%")
