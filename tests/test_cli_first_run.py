"""What a new user trips over on a first run: the wrong folder, no folder, a bundle overwritten, --version."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from featpipe import __version__
from tests.conftest import make_subset, one_line, run_cli


@pytest.fixture
def cache(tmp_path, warm_cache):
    """A writable copy of the warm cache: the small data dirs below are shipped photos, so nothing is computed."""
    return shutil.copytree(warm_cache, tmp_path / "cache")


def test_version_and_short_help():
    assert run_cli("--version", check=True).stdout.strip() == f"featpipe {__version__}"
    assert "--force" in run_cli("fit-head", "-h", check=True).stdout


def test_parent_of_split_folders_is_refused(tmp_path, shipped):
    data = tmp_path / "data"
    make_subset(shipped, data / "train", 2)
    make_subset(shipped, data / "val", 1)
    for command in ("extract", "fit-head"):
        line = one_line(run_cli(command, data, "--cache-dir", tmp_path / "c"))
        assert "split folders (train, val)" in line and f"pass {data / 'train'} as DATA_DIR" in line


def test_no_data_dir_is_said(cache):
    proc = run_cli("extract", "--cache-dir", cache, check=True)
    assert proc.stderr.strip().splitlines()[-1].startswith("featpipe: no DATA_DIR given: used the shipped demo set")


def test_bundle_records_its_data_and_is_not_overwritten_by_another(tmp_path, shipped, cache):
    a, b, out = make_subset(shipped, tmp_path / "a", 4), make_subset(shipped, tmp_path / "b", 3), tmp_path / "m"
    proc = run_cli("fit-head", a, "--cache-dir", cache, "--out", out, check=True)
    counts = {c: 4 for c in ("animals", "fishes", "monuments", "renewable_energy", "tools")}
    assert "classes: animals 4, fishes 4, monuments 4, renewable_energy 4, tools 4" in proc.stdout
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["data"] == {"dir": str(a), "class_counts": counts}
    umask = os.umask(0)
    os.umask(umask)
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == \
        {"bundle.json": 0o666 & ~umask, "head.safetensors": 0o666 & ~umask}
    line = one_line(run_cli("fit-head", b, "--cache-dir", cache, "--out", out))
    assert f"holds a model trained on {a}, not {b}; pass --force" in line
    assert json.loads((out / "bundle.json").read_text()) == manifest  # untouched
    run_cli("fit-head", a, "--cache-dir", cache, "--out", out, "--seed", "1", check=True)  # same data: refit
    run_cli("fit-head", b, "--cache-dir", cache, "--out", out, "--force", check=True)
    assert json.loads((out / "bundle.json").read_text())["data"]["dir"] == str(b)


def test_non_utf8_names_are_strict_json(small_data, cache):
    """Python holds such a name as lone surrogates; json.dumps would write them as \\udcff escapes, which strict
    readers (and most languages' JSON libraries) reject."""
    from urllib.parse import unquote_to_bytes

    bad = os.fsencode(small_data / "tools") + b"/\xff\xfe.jpg"
    with open(bad, "wb") as fh:
        fh.write(b"not an image")
    proc = run_cli("extract", small_data, "--cache-dir", cache, "--json", check=True)
    assert "\\ud" not in proc.stdout
    skipped = json.loads(proc.stdout)["skipped"]
    assert [unquote_to_bytes(s["path"]) for s in skipped] == [bad] and skipped[0]["path"].endswith("/%FF%FE.jpg")
