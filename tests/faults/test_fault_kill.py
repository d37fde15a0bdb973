"""SIGKILL `featpipe extract` at seeded random moments (and inside a commit); the cache stays whole and resumes."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

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
    """Kill the moment the replacement .h5 is being written (its .tmp exists), or let the run finish."""
    while proc.poll() is None:
        if any(cache.glob("*.h5.tmp")):
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
    for h5 in cache.glob("*.h5"):
        assert fk.h5_opens(h5), f"{h5} does not open after SIGKILL"
    before = fk.read_rows(cache)
    assert len(set(before.sha256)) == len(before) and set(before.sha256) <= digests
    assert before.embeddings.shape == (len(before), 1280) and np.isfinite(before.embeddings).all()
    res = run_json("extract", photos, "--cache-dir", cache, "--batch-size", "8", timeout=300)
    assert res["images"] == len(digests) and res["skipped"] == []
    assert res["computed"] + len(before) == len(digests)
    after = fk.read_rows(cache)
    assert sorted(after.sha256) == sorted(digests)
    assert not list(cache.glob("*.journal"))
