"""Static guarantees over featpipe's own source: nothing it loads can execute code."""

from __future__ import annotations

import ast
from pathlib import Path

import featpipe

SOURCES = sorted(Path(featpipe.__file__).parent.rglob("*.py"))


def _calls(name: str):
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == name:
                yield path, node


def test_torch_load_only_with_weights_only_true():
    calls = list(_calls("torch.load"))
    assert calls, "the checkpoint loader should be found by this scan"
    for path, node in calls:
        kw = {k.arg: k.value for k in node.keywords}
        assert "weights_only" in kw and ast.literal_eval(kw["weights_only"]) is True, f"{path}:{node.lineno}"


def test_no_pickle_anywhere_in_featpipe():
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not ({"pickle", "dill", "cloudpickle", "joblib"} & (imported | modules)), path
