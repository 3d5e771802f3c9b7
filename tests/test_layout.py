"""The package's shape, kept by tests: no import circles, renames only in files.py, every
command that writes a folder takes its output lock, every function-local import says why it
is local, and no function is longer than 60 lines (docs/architecture.md)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import crossdiff
from crossdiff.cli import COMMANDS

ROOT = Path(crossdiff.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _lazy_exports(path: Path) -> dict[str, str]:
    """What a package's ``__init__`` exports through crossdiff.lazy: name -> module."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "exports":
            return ast.literal_eval(node.args[1])
    return {}


def import_graph() -> dict[str, set[str]]:
    """Module -> the crossdiff modules it imports, function-local imports and lazy exports included."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set(_lazy_exports(path).values()) if path.name == "__init__.py" else set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("crossdiff"):
                exported = _lazy_exports(modules[node.module]) if node.module in modules else {}
                for alias in node.names:
                    targets.add(exported.get(alias.name) or resolve(f"{node.module}.{alias.name}"))
            elif isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names if a.name.startswith("crossdiff")}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles_in_any_package():
    graph = import_graph()
    assert {"crossdiff.train.trainer", "crossdiff.collect.collector", "crossdiff.run.stages"} <= set(graph)
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_outside_files_renames_or_replaces_files():
    """One place moves files into place (atomically, fsynced): crossdiff.files."""
    rename = re.compile(r"\bos\.(replace|rename)\(|\.rename\(|\.replace\(\s*\w+\s*\)|shutil\.move\(")
    offenders = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
                 for path in ROOT.rglob("*.py") if path.name != "files.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if rename.search(line) and not line.lstrip().startswith("#")]
    assert offenders == []


# inspect only reads; run and demo chain the stages, each of which locks its own folder.
UNLOCKED = {"inspect", "run", "demo"}


def test_every_command_that_writes_takes_the_output_lock():
    """The command's module, or a crossdiff module it imports, takes crossdiff.locks.output_lock."""
    graph = import_graph()
    modules = _modules()

    def reaches_lock(module: str, seen: set[str]) -> bool:
        if module in seen:
            return False
        seen.add(module)
        if "output_lock(" in modules[module].read_text():
            return True
        return any(reaches_lock(m, seen) for m in graph[module] if m.rpartition(".")[0] == module.rpartition(".")[0])

    missing = [name for name, (module, _) in COMMANDS.items()
               if name not in UNLOCKED and not reaches_lock(module, set())]
    assert missing == []


def test_every_command_module_defines_add_cli():
    for module, _ in COMMANDS.values():
        assert callable(importlib.import_module(module).add_cli)


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def unexplained_local_imports(source: str) -> list[int]:
    """Lines of the function-local imports in ``source`` that say nothing of why they are local:
    no ``#`` comment on their own lines or the line directly above, nor (in a run of imports)
    directly below an import that has one."""
    lines = source.splitlines()
    explained: dict[int, bool] = {}
    for function in _functions(ast.parse(source)):
        for block in ast.walk(function):
            for field in ("body", "orelse", "finalbody"):
                statements = getattr(block, field, None)
                previous = None
                for statement in statements if isinstance(statements, list) else []:
                    if isinstance(statement, (ast.Import, ast.ImportFrom)) and statement.lineno not in explained:
                        explained[statement.lineno] = (
                            any("#" in line for line in lines[statement.lineno - 1:statement.end_lineno])
                            or lines[statement.lineno - 2].lstrip().startswith("#")
                            or (isinstance(previous, (ast.Import, ast.ImportFrom)) and explained[previous.lineno]
                                and previous.end_lineno == statement.lineno - 1))
                    previous = statement
    return sorted(line for line, ok in explained.items() if not ok)


def test_every_function_local_import_says_why():
    """A function-local import defers something heavy or optional, or breaks a circle; the comment
    says which (docs/architecture.md). Anything else belongs at the top of the module."""
    unexplained = [f"{path.relative_to(ROOT)}:{line}" for path in sorted(ROOT.rglob("*.py"))
                   for line in unexplained_local_imports(path.read_text())]
    assert unexplained == []


def test_the_local_import_check_finds_an_unexplained_import():
    source = '''
import os


def f():
    import json  # deferred: a reason
    import re

    import sys
    # deferred: a reason
    from pathlib import Path
    if os:
        import csv

        def g():
            import io
'''
    assert unexplained_local_imports(source) == [9, 13, 16]


def test_no_function_is_longer_than_60_lines():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
            for path in sorted(ROOT.rglob("*.py")) for node in _functions(ast.parse(path.read_text()))
            if node.end_lineno - node.lineno + 1 > 60]
    assert long == []
