"""Fast, in-process unit tests of the formats: the cache (HDF5 + journal), the file index, the model bundle.
Real files, real h5py and safetensors; no subprocess, no model."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from featpipe import bundle as B
from featpipe.cache import Cache, CacheKey, Rows, merge
from featpipe.errors import UserError
from featpipe.fileindex import FileIndex
from featpipe.heads import Head
from featpipe.preprocess import Preprocessing

KEY = CacheKey("mobilenet_v2", "ab" * 32, Preprocessing(256, 224, (0.5,) * 3, (0.5,) * 3, "bilinear"), 4)


def rows(n: int, start: int = 0) -> Rows:
    ids = range(start, start + n)
    emb = np.random.default_rng(start).standard_normal((n, 4)).astype(np.float32)
    return Rows([f"{i:064x}" for i in ids], emb, [f"/d/c{i % 2}/{i}.jpg" for i in ids], [f"c{i % 2}" for i in ids])


def same(a: Rows, b: Rows) -> bool:
    return a.sha256 == b.sha256 and a.paths == b.paths and a.labels == b.labels and \
        np.array_equal(a.embeddings, b.embeddings)


def test_cache_commit_read_and_journal(tmp_path):
    """Committed rows read back exactly; appended rows (the journal) are seen by the next reader before any
    commit, as after a killed run."""
    with Cache(tmp_path, KEY) as c:
        c.commit(rows(5))
    with Cache(tmp_path, KEY) as c:
        assert same(c.read(), rows(5))
        c.append(rows(3, start=5))
    with Cache(tmp_path, KEY) as c:  # a new run: committed rows + the journal's
        assert same(c.read(), merge(rows(5), rows(3, start=5)))
        c.commit(c.read())
    assert (tmp_path / KEY.filename()).exists() and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_cache_keys_do_not_share_rows(tmp_path):
    other = CacheKey(KEY.backbone, "cd" * 32, KEY.preprocessing, KEY.dim)
    with Cache(tmp_path, KEY) as c:
        c.commit(rows(2))
    with Cache(tmp_path, other) as c:
        assert len(c.read()) == 0
    assert KEY.filename() != other.filename()


def test_merge_keeps_one_row_per_hash_and_the_newer_place():
    a, b = rows(3), rows(2, start=2)
    b.paths[0] = "/d/moved.jpg"
    m = merge(a, b)
    assert m.sha256 == a.sha256 + b.sha256[1:] and m.paths[2] == "/d/moved.jpg"


def test_file_index_remembers_unchanged_files_only(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir(), cache.mkdir()
    f, g = data / "a.jpg", data / "b.jpg"
    f.write_bytes(b"x"), g.write_bytes(b"y")
    idx = FileIndex(cache, "v1")
    later = time.time_ns() + 10**12  # as if read long after the last change: not a racy record
    for p, h in ((f, "h1"), (g, "h2")):
        idx.record(p, os.stat(p), h, later)
    idx.save(data)
    again = FileIndex(cache, "v1")
    assert again.unchanged(f, os.stat(f)) == "h1"
    g.write_bytes(b"changed!")
    assert again.unchanged(g, os.stat(g)) is None  # size and times moved: read it again
    assert json.loads((cache / again.path.name).read_text())["decoders"] == "v1"


def test_file_index_drops_a_failure_recorded_by_other_decoders(tmp_path):
    f = tmp_path / "a.jpg"
    f.write_bytes(b"x")
    idx = FileIndex(tmp_path, "v1")
    idx.record(f, os.stat(f), "h", time.time_ns() + 10**12)
    idx.record_failure(f, "not an image")
    idx.save(tmp_path)
    same_decoders, other = FileIndex(tmp_path, "v1"), FileIndex(tmp_path, "v2")
    assert same_decoders.unchanged(f, os.stat(f)) == "h" and same_decoders.failure(f) == "not an image"
    assert other.unchanged(f, os.stat(f)) == "h" and other.failure(f) is None


def head() -> Head:
    rng = np.random.default_rng(0)
    return Head("logistic", {"mean": np.zeros(4, np.float32), "scale": np.ones(4, np.float32),
                             "w1": rng.standard_normal((2, 4)).astype(np.float32), "b1": np.zeros(2, np.float32)},
                {"C": 1.0})


def test_bundle_round_trips_and_refuses_a_modified_file(tmp_path):
    b = B.Bundle(KEY.backbone, KEY.weights_sha256, KEY.preprocessing, ["c0", "c1"], head(), {"val_accuracy": 0.5},
                 data={"dir": "/d", "class_counts": {"c0": 1, "c1": 1}})
    out = B.save(b, tmp_path / "m")
    back = B.load(out)
    assert back.classes == ["c0", "c1"] and back.head.params == {"C": 1.0} and back.data["dir"] == "/d"
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(back.head.predict_proba(x), b.head.predict_proba(x))
    manifest = json.loads((out / "bundle.json").read_text())
    name = next(iter(manifest["files"]))
    blob = bytearray((out / name).read_bytes())
    blob[-1] ^= 0xFF
    (out / name).write_bytes(bytes(blob))
    with pytest.raises(UserError, match="corrupt or was modified"):
        B.load(out)
