"""The package's layers only point down: no import circle between featpipe's modules, counting every import
(module level, inside functions, under TYPE_CHECKING). Parsed, not imported: nothing here loads torch."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "featpipe"
MAX_LINES = 350


def module_name(path: Path) -> str:
    """Dotted name relative to featpipe: `decode.pil`; a package's __init__ is the package (`decode`)."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def edges(tree: ast.AST, modules: set[str]) -> set[str]:
    """The featpipe modules `tree` imports: for `from featpipe.x import y`, module x.y when y is a module, else x."""
    deps = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "featpipe":
            base = node.module.removeprefix("featpipe").removeprefix(".")
            for a in node.names:
                sub = f"{base}.{a.name}" if base else a.name
                deps.add(sub if sub in modules else base)
        elif isinstance(node, ast.Import):
            deps |= {a.name.removeprefix("featpipe.") for a in node.names if a.name.startswith("featpipe.")}
    return deps & modules


def imports() -> dict[str, set[str]]:
    """module -> the featpipe modules it imports anywhere in its source."""
    modules = {module_name(p) for p in sources()}
    return {module_name(p): edges(ast.parse(p.read_text()), modules) - {module_name(p)} for p in sources()}


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


def test_the_checker_sees_imports_of_subpackage_modules():
    modules = {"engine", "decode", "decode.pil", "decode.probing", "dataset"}
    cases = {"from featpipe.decode.pil import PilDecoder": {"decode.pil"},
             "import featpipe.decode.pil": {"decode.pil"},
             "from featpipe.decode import probing, probe": {"decode.probing", "decode"},  # a module, a function
             "from featpipe import decode, dataset\nimport featpipe.engine": {"decode", "dataset", "engine"}}
    for source, want in cases.items():
        assert edges(ast.parse(source), modules) == want, source
    assert module_name(PACKAGE / "decode" / "__init__.py") == "decode"
    assert module_name(PACKAGE / "decode" / "pil.py") == "decode.pil"


def test_no_import_circle_in_featpipe():
    graph = imports()
    assert {"heads", "bundle", "extract", "engine", "registry", "backbone", "decode", "decode.pil"} <= set(graph)
    assert circles(graph) == []


def test_no_module_is_over_350_lines():
    """Past that a module holds more than one concern; split it by concern (as featpipe/decode/ is)."""
    long = {module_name(p): n for p in sources() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_architecture_md_names_every_module():
    """docs/architecture.md is the module map: a module it does not name is a module a newcomer cannot place."""
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    named = {p.relative_to(PACKAGE).as_posix() for p in sources() if p.name != "__main__.py"}
    missing = sorted(n for n in named if f"`{n}`" not in doc and f"`{Path(n).name}`" not in doc
                     and not (n.endswith("__init__.py") and f"`{Path(n).parent}/`" in doc))
    assert missing == []
