"""Shared fixtures: real images (the shipped set), real weights, the real CLI in a subprocess."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from featpipe.dataset import shipped_dataset

FULL = os.environ.get("FEATPIPE_FULL") == "1"  # `make test-all`: every slow trial, not CI's seeded subset
# Whole modules of heavy work: training networks, benches, Ray clusters, hostile-input and kill trials.
SLOW_MODULES = {"test_train", "test_experiment", "test_bench", "test_ray_engine", "test_extract", "test_offline",
                "test_precision", "test_duplicates", "test_allocator", "test_cli_first_run", "test_predict",
                "test_onnx"}


def pytest_collection_modifyitems(items) -> None:
    """`pytest -m "not slow"` is the fast, in-process tier: a test is slow if it runs featpipe in a subprocess
    (each loads torch: seconds apiece) or sits in a module of heavy work (SLOW_MODULES, tests/faults/)."""
    for item in items:
        path = Path(str(item.fspath))
        source = inspect.getsource(item.function) if hasattr(item, "function") else ""
        if path.stem in SLOW_MODULES or "faults" in path.parts or "run_cli(" in source or "run_json(" in source:
            item.add_marker(pytest.mark.slow)


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, check: bool = False):
    """Run `python -m featpipe ARGS` as a user would; returns CompletedProcess with text stdout/stderr."""
    proc = subprocess.run([sys.executable, "-m", "featpipe", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"featpipe {' '.join(map(str, args))} -> {proc.returncode}\n{proc.stderr}")
    return proc


def journalled_bytes(cache: Path) -> int:
    """Bytes in a cache dir's journals now (a journal a publish deletes while this looks counts 0)."""
    total = 0
    for p in cache.rglob("journal-*.fpj"):
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_size
    return total


def one_line(proc) -> str:
    """The one stderr line of a refused command (exit 2, nothing on stdout)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and proc.stdout == "", proc.stderr
    return lines[0]


def run_json(*args: str, **kw) -> dict:
    proc = run_cli(*args, "--json", check=True, **kw)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"--json must print exactly one line, got: {proc.stdout!r}"
    return json.loads(lines[0])


@pytest.fixture(scope="session")
def shipped() -> Path:
    return shipped_dataset()


def make_subset(src: Path, dst: Path, per_class: int) -> Path:
    """A small real ImageFolder: the first `per_class` photos of each shipped class."""
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:per_class]:
            shutil.copy(f, dst / cls.name / f.name)
    return dst


def held_out_folders(shipped: Path, root: Path) -> tuple[Path, Path, Path]:
    """train (6 per class), val (2) and test (2) folders of real photos; the test photos sit under the next class's
    folder, so a model right about them scores low there: test_accuracy is computed from the test set's labels."""
    classes = sorted(p for p in shipped.iterdir() if p.is_dir())
    for i, cls in enumerate(classes):
        photos = sorted(cls.iterdir())
        for name, part, label in (("train", photos[:6], cls.name), ("val", photos[6:8], cls.name),
                                  ("test", photos[8:10], classes[(i + 1) % len(classes)].name)):
            (root / name / label).mkdir(parents=True, exist_ok=True)
            for f in part:
                shutil.copy(f, root / name / label / f.name)
    return root / "train", root / "val", root / "test"


@pytest.fixture
def small_data(tmp_path, shipped) -> Path:
    """5 classes x 4 real photos, in a fresh tmp dir the test may modify."""
    return make_subset(shipped, tmp_path / "data", 4)


@pytest.fixture(scope="session")
def warm_cache(tmp_path_factory, shipped) -> Path:
    """A cache dir holding mobilenet_v2 features of the whole shipped set (computed once per session)."""
    d = tmp_path_factory.mktemp("warm-cache")
    run_cli("extract", "--cache-dir", d, check=True)
    return d
