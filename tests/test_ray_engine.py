"""`--engine ray` on a local 2-actor Ray: the local engine's rows and skips, resumable, and a dying worker is retried.

Ray start-up is slow on small machines, so one Ray run (with one actor killed mid-run) backs most tests.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest

from featpipe.ray_engine import DIE_ONCE_ENV, RAY_SOCKET_SUFFIX, ray_temp_dir
from tests.conftest import make_subset, run_cli, run_json

pytest.importorskip("ray")

# Like-for-like on both engines. 24-image batches: both actors get one, and each result (24 x 1280 floats) is over
# Ray's 100 KiB inline limit, so it comes back through the object store (zero-copy views must not outlive Ray).
SAME = ("--decoder", "pil", "--precision", "fp32", "--batch-size", "24")


@pytest.fixture(scope="module")
def data(tmp_path_factory, shipped):
    """40 real photos, a garbage .jpg (skipped by the driver's probe) and a truncated JPEG (fails in the decoder)."""
    d = make_subset(shipped, tmp_path_factory.mktemp("ray-data") / "data", 8)
    first = sorted((d / "animals").iterdir())[0]
    (d / "animals" / "zz_garbage.jpg").write_bytes(b"this is not a jpeg\n" * 20)
    (d / "animals" / "zz_truncated.jpg").write_bytes(first.read_bytes()[:4000])
    return d


@pytest.fixture(scope="module")
def local_run(data, tmp_path_factory):
    return run_json("extract", data, "--cache-dir", tmp_path_factory.mktemp("local-cache"), *SAME)


@pytest.fixture(scope="module")
def ray_run(data, tmp_path_factory):
    """One Ray run in which the first actor to get a batch dies (os._exit) once and is restarted; also the
    processes of that run still there a few seconds after it exited."""
    marker = tmp_path_factory.mktemp("ray-hook") / "died"
    cache = Path(tempfile.mkdtemp(prefix="fp-", dir="/tmp"))  # short: Ray's session dir is <cache>/.ray, not shared
    assert ray_temp_dir(cache) == cache / ".ray"
    run_id = uuid.uuid4().hex
    try:
        res = run_json("extract", data, "--engine", "ray", "--workers", "2", "--cache-dir", cache, *SAME,
                       env={DIE_ONCE_ENV: str(marker), "FEATPIPE_TEST_RUN": run_id})
        yield res, marker, cache, processes_left(cache / ".ray", f"FEATPIPE_TEST_RUN={run_id}", wait=5)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def processes_left(ray_dir: Path, tag: str, wait: float) -> list[str]:
    """'pid name' of each process of a run, after waiting up to `wait` seconds for them to go: its workers inherit
    the driver's environment (`tag`), and every Ray process keeps its log files in the run's `ray_dir` open."""
    deadline = time.monotonic() + wait
    while (found := [f"{d.name} {_read(d / 'comm').strip()}" for d in Path("/proc").glob("[0-9]*")
                     if _belongs(d, str(ray_dir), tag.encode())]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def _belongs(proc: Path, ray_dir: str, tag: bytes) -> bool:
    if tag in _read(proc / "environ", binary=True).split(b"\0"):
        return True
    try:
        return any(os.readlink(fd).startswith(ray_dir) for fd in (proc / "fd").iterdir())
    except OSError:  # gone meanwhile, or not ours to look into
        return False


def _read(path: Path, binary: bool = False):
    try:
        return path.read_bytes() if binary else path.read_text()
    except OSError:
        return b"" if binary else ""


def rows(cache_file: str) -> dict[bytes, np.ndarray]:
    with h5py.File(cache_file, "r") as f:
        return dict(zip(f["sha256"][:], f["embeddings"][:]))


def test_same_hashes_and_embeddings_as_local(local_run, ray_run):
    res = ray_run[0]
    want, got = rows(local_run["cache_file"]), rows(res["cache_file"])
    assert set(got) == set(want) and len(got) == local_run["computed"] == res["computed"] == 40
    for sha, e in got.items():
        w = want[sha]
        assert float(e @ w / (np.linalg.norm(e) * np.linalg.norm(w))) >= 0.999, sha
    assert (res["decoder"], res["device"], res["precision"]) == ("pil", "cpu", "fp32")


def test_corrupt_files_skipped_and_listed_like_local(local_run, ray_run):
    res = ray_run[0]
    assert res["skipped"] == local_run["skipped"]
    assert {s["path"].rsplit("/", 1)[1] for s in res["skipped"]} >= {"zz_garbage.jpg"}
    assert res["images"] == 42


def test_run_survives_a_worker_dying(ray_run):
    res, marker = ray_run[:2]
    assert marker.exists(), "the test hook never fired: no actor died"
    assert res["computed"] == 40 and res["computed"] + len(res["skipped"]) == res["images"]


def test_second_run_computes_nothing_and_starts_no_ray(data, ray_run, tmp_path):
    """Without the truncated file (never cached, so re-tried each run, as locally) nothing is left to compute."""
    cache = ray_run[2]
    again_data = tmp_path / "data"
    shutil.copytree(data, again_data)
    (again_data / "animals" / "zz_truncated.jpg").unlink()
    again = run_json("extract", again_data, "--engine", "ray", "--cache-dir", cache, *SAME)
    assert (again["computed"], again["reused"], len(again["skipped"])) == (0, 40, 1)
    assert "ray_start" not in again["stage_seconds"]


def test_local_ray_leaves_no_process_behind(ray_run):
    """ray.shutdown() left the raylet's agents and the workers running, orphaned, for a minute or two."""
    assert ray_run[3] == []


def test_more_workers_than_cpus_is_a_user_error(small_data, tmp_path):
    """A local Ray used to be given as many CPUs as --workers asked for; now: one line, before Ray starts."""
    n = len(os.sched_getaffinity(0)) + 6
    t0 = time.perf_counter()
    proc = run_cli("extract", small_data, "--engine", "ray", "--device", "cpu", "--workers", n, "--cache-dir",
                   tmp_path / "c", timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert f"--workers {n}" in lines[0] and f"{len(os.sched_getaffinity(0))} CPUs" in lines[0]
    assert time.perf_counter() - t0 < 60 and not (tmp_path / "c" / ".ray").exists()


def test_missing_ray_is_a_user_error(small_data, tmp_path):
    fake = tmp_path / "no-ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no ray here')\n")
    proc = run_cli("extract", small_data, "--engine", "ray", "--cache-dir", tmp_path / "c",
                   env={"PYTHONPATH": str(fake.parent)})
    assert proc.returncode == 2 and "pip install featpipe[ray]" in proc.stderr


def test_unreachable_ray_address_fails_fast(small_data, tmp_path):
    proc = run_cli("extract", small_data, "--engine", "ray", "--ray-address", "127.0.0.1:1", "--cache-dir",
                   tmp_path / "c", timeout=120)
    assert proc.returncode == 2 and "cannot reach the Ray head at 127.0.0.1:1" in proc.stderr


def test_ray_flags_need_engine_ray(small_data, tmp_path):
    proc = run_cli("extract", small_data, "--workers", "2", "--cache-dir", tmp_path / "c")
    assert proc.returncode == 2 and "--engine ray" in proc.stderr


def test_ray_temp_dir_stays_within_the_unix_socket_limit(tmp_path):
    short = Path(tempfile.mkdtemp(prefix="fp-", dir="/tmp"))
    try:
        assert ray_temp_dir(short) == short / ".ray"
        for n in range(10, 35):  # around the limit (a 46-byte .ray dir once slipped through and broke ray.init)
            d = ray_temp_dir(short / ("y" * n))
            assert len(str(d) + RAY_SOCKET_SUFFIX) <= 107, d
    finally:
        shutil.rmtree(short)
    deep = ray_temp_dir(tmp_path / ("x" * 80))
    assert deep.is_dir() and len(str(deep)) < 40
