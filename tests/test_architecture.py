"""The package's layers only point down: no import circle between featpipe's modules, counting every import
(module level, inside functions, under TYPE_CHECKING). Parsed, not imported: nothing here loads torch."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "featpipe"


def imports() -> dict[str, set[str]]:
    """module -> the featpipe modules it imports anywhere in its source."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {}
    for path in PACKAGE.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "featpipe":
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("featpipe."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("featpipe.")}
        graph[path.stem] = deps - {path.stem}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import path that comes back to where it started, found by depth-first search from each module."""
    found = set()

    def walk(path: list[str]) -> None:
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == path[0]:
                found.add(tuple(path))
            elif nxt not in path and nxt > path[0]:  # each circle once: from its smallest module
                walk(path + [nxt])

    for start in sorted(graph):
        walk([start])
    return sorted(list(c) for c in found)


def test_the_checker_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_featpipe():
    graph = imports()
    assert {"heads", "bundle", "extract", "engine", "registry", "backbone"} <= set(graph)
    assert circles(graph) == []
