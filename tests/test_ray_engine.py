"""`--engine ray` on Ray Data: a local 2-actor Ray gives the local engine's rows and skips, resumes, survives a
worker dying mid-run, and starts no Ray when nothing is left; a real two-node cluster gets actors on both nodes;
the driver reads almost none of the images' bytes.

Ray start-up is slow on small machines, so one Ray run (with one actor killed mid-run) backs most tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from featpipe.dataset import scan
from featpipe.journal import locked_new
from featpipe.ray_data import remove_dead_listings
from featpipe.ray_session import DIE_ONCE_ENV, RAY_SOCKET_SUFFIX, ray_temp_dir
from tests.conftest import journalled_bytes, make_subset, one_line, run_cli, run_json
from tests.test_webdataset import sample, wait_until_indexable, write_tar

pytest.importorskip("ray")

# Like-for-like on both engines. 24-image batches: each of the two actors gets about one batch of the 41 files read.
SAME = ("--decoder", "pil", "--precision", "fp32", "--batch-size", "24")
NODES = re.compile(r"featpipe: ray: (\d+) files read on (\d+) node\(s\): (.*)")


@pytest.fixture(scope="module")
def data(tmp_path_factory, shipped):
    """40 real photos, a garbage .jpg (skipped by the worker's probe) and a truncated JPEG (fails in the decoder)."""
    d = make_subset(shipped, tmp_path_factory.mktemp("ray-data") / "data", 8)
    first = sorted((d / "animals").iterdir())[0]
    (d / "animals" / "zz_garbage.jpg").write_bytes(b"this is not a jpeg\n" * 20)
    (d / "animals" / "zz_truncated.jpg").write_bytes(first.read_bytes()[:4000])
    return d


@pytest.fixture(scope="module")
def local_run(data, tmp_path_factory):
    return run_json("extract", data, "--cache-dir", tmp_path_factory.mktemp("local-cache"), *SAME)


@pytest.fixture(scope="module")
def ray_run(data, local_run, tmp_path_factory):
    """One Ray run in which the first actor to finish a batch dies (os._exit) after journalling its rows and before
    returning them, and is restarted; also the processes of that run still there a few seconds after it exited.
    After local_run: the files are then older than the file index's racy window, so this run records them."""
    marker = tmp_path_factory.mktemp("ray-hook") / "died"
    cache = Path(tempfile.mkdtemp(prefix="fp-", dir="/tmp"))  # short: Ray's session dir is <cache>/.ray, not shared
    assert ray_temp_dir(cache) == cache / ".ray"
    run_id = uuid.uuid4().hex
    try:
        proc = run_cli("extract", data, "--engine", "ray", "--workers", "2", "--cache-dir", cache, *SAME, "--json",
                       env={DIE_ONCE_ENV: str(marker), "FEATPIPE_TEST_RUN": run_id}, check=True)
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        assert len(lines) == 1, f"--json must print exactly one line, got: {proc.stdout!r}"
        yield json.loads(lines[0]), marker, cache, processes_left(cache / ".ray", f"FEATPIPE_TEST_RUN={run_id}",
                                                                  wait=5), proc.stderr
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
    assert set(res) == set(local_run)  # the same --json object


def test_every_image_exactly_once_though_a_batch_was_journalled_twice(ray_run):
    """The dead actor's journal and its retried batch held the same rows: the table shows each once, and nothing
    is left in journals (every actor's journal published, the dead one's adopted)."""
    res, _marker, cache = ray_run[:3]
    with h5py.File(res["cache_file"], "r") as f:
        sha = f["sha256"][:]
    assert len(sha) == len(set(sha)) == 40
    key_dir = Path(res["cache_file"]).with_suffix("")
    assert list(key_dir.glob("journal-*")) == [] and list(cache.glob(".ray-listing-*")) == []


def test_corrupt_files_skipped_and_listed_like_local(local_run, ray_run):
    res = ray_run[0]
    assert res["skipped"] == local_run["skipped"]
    assert {s["path"].rsplit("/", 1)[1] for s in res["skipped"]} >= {"zz_garbage.jpg"}
    assert res["images"] == 42


def test_run_survives_a_worker_dying(ray_run):
    res, marker = ray_run[:2]
    assert marker.exists(), "the test hook never fired: no actor died"
    assert res["computed"] == 40 and res["computed"] + len(res["skipped"]) == res["images"]


def test_second_run_computes_nothing_and_starts_no_ray(data, ray_run):
    """The driver's file index settles every file by its stat: cached, or known not to decode (the two corrupt
    ones, reported again with their reasons): no byte read, no Ray started."""
    res, cache = ray_run[0], ray_run[2]
    again = run_json("extract", data, "--engine", "ray", "--cache-dir", cache, *SAME)
    assert (again["computed"], again["reused"], again["skipped"]) == (0, 40, res["skipped"])
    assert "ray_start" not in again["stage_seconds"] and "read" not in again["stage_seconds"]


def test_local_ray_leaves_no_process_behind(ray_run):
    """ray.shutdown() left the raylet's agents and the workers running, orphaned, for a minute or two."""
    assert ray_run[3] == []


def test_a_killed_driver_loses_only_what_was_in_flight(shipped):
    """SIGKILL the driver once its actors have journalled rows: its local Ray goes too (the raylet and GCS at once,
    PR_SET_PDEATHSIG on the thread that started them; their agents a minute later), and the next run publishes the
    dead actors' journals, computes only the rest, removes the dead driver's file listing and ends with every
    image exactly once."""
    cache = Path(tempfile.mkdtemp(prefix="fp-", dir="/tmp"))  # short: Ray's session dir is <cache>/.ray
    run_id = uuid.uuid4().hex
    args = ["extract", shipped, "--engine", "ray", "--workers", "2", "--cache-dir", cache, *SAME[:4],
            "--batch-size", "4"]
    try:
        proc = subprocess.Popen([sys.executable, "-m", "featpipe", *map(str, args)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ, "FEATPIPE_TEST_RUN": run_id})
        deadline = time.monotonic() + 300
        while not journalled_bytes(cache) and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before the test could kill it"
            time.sleep(0.05)
        assert proc.poll() is None, "no actor journalled a row in time"
        proc.kill()
        proc.wait()
        assert list(cache.glob(".ray-listing-*")), "the killed driver's listing should be there to clean up"
        # Ray's agents outlive their raylet by ~61 s: they publish its death to a GCS that died with it, and
        # ray/_private/utils.py's publish_error_to_driver gives that a fixed 60 s timeout
        assert processes_left(cache / ".ray", f"FEATPIPE_TEST_RUN={run_id}", wait=90) == []
        again = run_json(*args)
        total = len({p.read_bytes() for p in shipped.rglob("*.jpg")})
        info = run_json("cache", "info", "--cache-dir", cache)["caches"][0]
        assert 0 < again["computed"] < total and info["rows"] == total, (again["computed"], info["rows"], total)
        assert not list(cache.glob(".ray-listing-*"))
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def test_a_listing_is_dead_when_its_lock_is_free_whatever_its_pid(tmp_path):
    """pids are reused: a killed driver's listing goes though its pid now names a running process (this test's),
    and a running driver's stays though its pid names none."""
    host = socket.gethostname()
    live, reused, bare = (tmp_path / f".ray-listing-{host}-{pid}-{tag}" for pid, tag in
                          ((999_999_999, "aaaaaaaa"), (os.getpid(), "bbbbbbbb"), (1, "cccccccc")))
    owner = locked_new(tmp_path / f"{live.name}.lock")
    (tmp_path / f"{reused.name}.lock").write_bytes(b"")  # its driver was killed: nothing holds the lock
    for d in (live, reused, bare):  # bare: left by a featpipe from before listing locks
        d.mkdir()
        (d / "part-00000.parquet").write_bytes(b"x")
    remove_dead_listings(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, f"{live.name}.lock"]
    owner.close()
    remove_dead_listings(tmp_path)
    assert list(tmp_path.iterdir()) == []


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


def test_shards_on_ray_give_the_local_engines_rows_and_skips_and_are_not_opened_again(data, tmp_path):
    """WebDataset shards with --engine ray: an actor streams each shard; the rows, skips (a garbage sample, a
    truncated JPEG, a damaged shard's tail, copies of samples of another shard) and members are the local engine's;
    a second run lists every shard (an empty one too) from the file index: no shard opened, no Ray started."""
    files = [f for f in sorted(data.rglob("*.jpg"))]
    shards = tmp_path / "shards"
    shards.mkdir()
    items = [m for i, f in enumerate(files) for m in sample(f"{i:06d}", f.read_bytes(), f.parent.name)]
    write_tar(shards / "s-000000.tar", items[:40])
    write_tar(shards / "s-000001.tar", items[40:])
    whole = (shards / "s-000000.tar").read_bytes()
    (shards / "s-000002.tar").write_bytes(whole[:len(whole) * 6 // 10])  # cut mid-member: the tail is damaged
    write_tar(shards / "s-000003.tar", [])  # no sample: its actor returns no row, yet it is listed as read
    pattern = str(shards / "s-{000000..000003}.tar")
    local = run_json("extract", pattern, "--cache-dir", tmp_path / "local", *SAME)
    wait_until_indexable(*shards.iterdir())
    proc = run_cli("extract", pattern, "--engine", "ray", "--workers", "2", "--cache-dir", tmp_path / "ray", *SAME,
                   "--json", check=True)
    res = json.loads(proc.stdout)
    assert re.search(r"featpipe: ray: 4 shards read on 1 node\(s\): node \w+ \d+ samples", proc.stderr)
    assert (res["images"], res["computed"], res["reused"], res["skipped"]) == (
        local["images"], local["computed"], local["reused"], local["skipped"])
    assert local["computed"] == 40 and any(s["path"] == str(shards / "s-000002.tar") and
                                           s["reason"].startswith("damaged or truncated tar") for s in res["skipped"])
    want, got = rows(local["cache_file"]), rows(res["cache_file"])
    assert set(got) == set(want)
    assert all(float(e @ want[h] / (np.linalg.norm(e) * np.linalg.norm(want[h]))) >= 0.999 for h, e in got.items())
    again = run_cli("extract", pattern, "--engine", "ray", "--cache-dir", tmp_path / "ray", *SAME, "--json",
                    check=True)
    second = json.loads(again.stdout)
    assert (second["computed"], second["reused"], second["skipped"]) == (0, res["reused"] + res["computed"],
                                                                         res["skipped"])
    assert "featpipe: ray:" not in again.stderr and "read" not in second["stage_seconds"]
    from featpipe.extract import ExtractConfig
    from featpipe.features import load_features

    members = [load_features(ExtractConfig(shards=[pattern], cache_dir=tmp_path / c, decoder="pil",
                                           precision="fp32", device="cpu"), progress=False) for c in ("local", "ray")]
    assert members[0].paths == members[1].paths and (members[0].y == members[1].y).all()


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node, each a real Ray node with one CPU (ray.cluster_utils.Cluster: their own raylets,
    one GCS), started here, not by the driver: no Ray process is the driver's child."""
    from ray.cluster_utils import Cluster

    temp = Path(tempfile.mkdtemp(prefix="fp2n-", dir="/tmp"))
    (temp / "ray").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", str(temp))  # Ray notes the cluster's address there, not in the machine's /tmp/ray
        c = Cluster()
        try:
            c.add_node(num_cpus=1, include_dashboard=False, temp_dir=str(temp))  # the head
            c.add_node(num_cpus=1)
            c.wait_for_nodes()
            yield c
        finally:
            c.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


def test_two_node_cluster_runs_actors_on_both_nodes(cluster, small_data, tmp_path):
    """`--ray-address` joins the cluster; one actor lands on each node, and each reads and embeds part of the files
    from the shared folder into the shared cache."""
    res = run_cli("extract", small_data, "--engine", "ray", "--ray-address", cluster.address, "--workers", "2",
                  "--cache-dir", tmp_path / "c", "--decoder", "pil", "--precision", "fp32", "--batch-size", "2",
                  "--json", check=True)
    out = json.loads(res.stdout)
    assert (out["computed"], out["images"]) == (20, 20)
    files, nodes, per_node = NODES.search(res.stderr).groups()
    assert (files, nodes) == ("20", "2"), res.stderr[-2000:]
    assert all(int(n) > 0 for n in re.findall(r"node \w+ (\d+)", per_node))


def test_on_a_gpu_cluster_each_actor_takes_a_gpu(small_data, tmp_path):
    """The GPU path's scheduling, on a node that declares one GPU (Ray counts it; torch still runs on the CPU
    here): one actor per GPU, so `--workers 2` is refused in one line naming both limits, and the default runs
    everything on one actor."""
    from ray.cluster_utils import Cluster

    temp = Path(tempfile.mkdtemp(prefix="fpgpu-", dir="/tmp"))
    (temp / "ray").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", str(temp))
        c = Cluster()
        try:
            c.add_node(num_cpus=2, num_gpus=1, include_dashboard=False, temp_dir=str(temp))
            c.wait_for_nodes()
            flags = ("--engine", "ray", "--ray-address", c.address, "--cache-dir", tmp_path / "c", *SAME)
            refused = one_line(run_cli("extract", small_data, *flags, "--workers", "2"))
            assert "it has 2 CPUs and 1 GPUs, and each worker needs one CPU and one GPU" in refused
            res = run_cli("extract", small_data, *flags, "--json", check=True)
        finally:
            c.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
    assert json.loads(res.stdout)["computed"] == 20
    assert re.search(r"node \w+ 20\b", NODES.search(res.stderr).group(3)), res.stderr[-2000:]


RCHAR_CHILD = """
import json, sys
from pathlib import Path
import featpipe.extract as E
from featpipe.ray_data import RayDataEngine

def rchar():
    return int(dict(line.split(': ') for line in open('/proc/self/io').read().splitlines())['rchar'])

def measured(self, *args, _run=RayDataEngine.run):  # the engine's own run, with the driver's reads around it
    before = rchar()
    try:
        return _run(self, *args)
    finally:
        read.append(rchar() - before)

read = []
RayDataEngine.run = measured
cfg = dict(engine='ray', ray_address=sys.argv[1], workers=2, device='cpu', decoder='pil', precision='fp32')
warm = E.extract(E.ExtractConfig(data_dir=Path(sys.argv[2]), cache_dir=Path(sys.argv[4]) / 'warm', **cfg))
res = E.extract(E.ExtractConfig(data_dir=Path(sys.argv[3]), cache_dir=Path(sys.argv[4]) / 'cold', **cfg))
print(json.dumps({'rchar': read[-1], 'computed': res.computed, 'images': res.images, 'warm': warm.computed}))
"""


def test_the_driver_reads_almost_none_of_the_image_bytes(cluster, shipped, small_data, tmp_path):
    """>= 200 distinct images (the shipped photos, cropped and re-encoded): while the engine runs (listing, Ray
    Data, the workers' records, the file index), the driver process reads (rchar: every read() and recv()) under
    10 % of their bytes. Measured on a cluster the driver did not start (a local Ray's processes are the driver's
    children, whose reads the kernel adds to its own when they exit), after a first run on other files (Ray Data
    imports its modules on first use: their .pyc reads are not the images')."""
    data = tmp_path / "many"
    _root, photos, _classes = scan(shipped)
    for i in range(200):
        f = photos[i % len(photos)]
        (data / f.label).mkdir(parents=True, exist_ok=True)
        with Image.open(f.path) as im:
            im.convert("RGB").crop((i % 7, i % 5, im.width - 3, im.height - 2)).save(data / f.label / f"{i:03d}.jpg",
                                                                                   quality=90)
    total = sum(p.stat().st_size for p in data.rglob("*.jpg"))
    proc = subprocess.run([sys.executable, "-c", RCHAR_CHILD, cluster.address, str(small_data), str(data),
                           str(tmp_path / "caches")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (got["computed"], got["images"], got["warm"]) == (200, 200, 20)
    print(f"driver read {got['rchar']} bytes for {total} bytes of images ({got['rchar'] / total:.1%})")
    assert got["rchar"] < 0.10 * total, (got["rchar"], total)
