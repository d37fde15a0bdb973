"""SIGKILL `featpipe extract` at seeded random moments (and while a shard or the table is published), and
`featpipe cache compact` likewise: the cache stays whole, and the next run resumes."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from featpipe.cache import Cache
from featpipe.rows import Rows

from tests.conftest import FULL, make_subset, run_json
from tests.faults import faultkit as fk

SLOW = [pytest.mark.slow, pytest.mark.skipif(not FULL, reason="FEATPIPE_FULL=1 (make test-all) runs every trial")]
TRIALS = [*range(4), "commit", *(pytest.param(s, marks=SLOW) for s in range(4, 16)),
          pytest.param("commit-2", marks=SLOW)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory, shipped) -> Path:
    """60 real photos: a run lasts a few seconds on two busy cores, long enough to be killed anywhere in it."""
    return make_subset(shipped, tmp_path_factory.mktemp("kill") / "data", 12)


def start(data: Path, cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "featpipe", "extract", str(data), "--cache-dir", str(cache),
                             "--batch-size", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_after(proc: subprocess.Popen, seconds: float) -> None:
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def kill_in_commit(proc: subprocess.Popen, cache: Path) -> None:
    """Kill the moment a shard or the table is being written (its .tmp exists), or let the run finish."""
    while proc.poll() is None:
        if any(cache.rglob("*.h5.tmp")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    proc.wait()


@pytest.fixture(scope="module")
def digests(photos) -> set[str]:
    return {fk.sha256_of(p) for p in photos.glob("*/*.jpg")}


@pytest.mark.parametrize("trial", TRIALS)
def test_kill_then_resume(tmp_path, photos, digests, trial):
    cache = tmp_path / "cache"
    proc = start(photos, cache)
    if str(trial).startswith("commit"):
        kill_in_commit(proc, cache)
    else:
        kill_after(proc, random.Random(trial).uniform(0.5, 6.0))
    for h5 in cache.rglob("*.h5"):
        assert fk.h5_opens(h5), f"{h5} does not open after SIGKILL"
    before = fk.read_rows(cache)
    assert len(set(before.sha256)) == len(before) and set(before.sha256) <= digests
    assert before.embeddings.shape == (len(before), 1280) and np.isfinite(before.embeddings).all()
    res = run_json("extract", photos, "--cache-dir", cache, "--batch-size", "8", timeout=300)
    assert res["images"] == len(digests) and res["skipped"] == []
    assert res["computed"] + len(before) == len(digests)
    after = fk.read_rows(cache)
    assert sorted(after.sha256) == sorted(digests)
    assert not list(cache.rglob("journal-*"))


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    """20 shards of 2,000 synthetic rows each (no file index: compact merges, drops nothing)."""
    cache = tmp_path_factory.mktemp("compact") / "cache"
    key = fk.cache_for(cache).key
    rng = np.random.default_rng(0)
    for s in range(20):
        with Cache(cache, key) as c:
            ids = range(s * 2000, (s + 1) * 2000)
            c.append(Rows([f"{i:064x}" for i in ids], rng.standard_normal((2000, key.dim), np.float32),
                          [f"/d/{i}.jpg" for i in ids], ["c"] * 2000))
            c.publish()
    return cache


@pytest.mark.parametrize("trial", [0, 1, "tmp", pytest.param(2, marks=SLOW), pytest.param(3, marks=SLOW)])
def test_kill_compact_then_compact_again(tmp_path, small_shards, trial):
    """A compact killed anywhere leaves every row readable once (reader and plain h5py); the next one finishes."""
    cache = tmp_path / "cache"
    shutil.copytree(small_shards, cache)
    proc = subprocess.Popen([sys.executable, "-m", "featpipe", "cache", "compact", "--cache-dir", str(cache)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if trial == "tmp":
        kill_in_commit(proc, cache)
    else:
        kill_after(proc, random.Random(trial).uniform(0.6, 1.8))  # the compact lasts ~1.8 s here
    want = [f"{i:064x}" for i in range(40_000)]
    assert sorted(fk.read_rows(cache).sha256) == want
    c = fk.cache_for(cache)
    with h5py.File(c.path, "r") as f:
        assert sorted(h.decode() for h in f["sha256"][:]) == want
    res = run_json("cache", "compact", "--cache-dir", cache, timeout=300)
    assert res["caches"][0]["shards_after"] == 1 and sorted(fk.read_rows(cache).sha256) == want
    assert {p.name for p in c.dir.glob("*.h5")} == set(c.shards())
