"""The cache under abuse: corrupted or truncated files, torn journals, two writers at once, files that change."""

from __future__ import annotations

import json
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from featpipe.cache import Cache
from featpipe.rows import Rows
from featpipe.extract import ExtractConfig, extract
from featpipe.features import load_features
from tests.conftest import make_subset, run_cli, run_json
from tests.faults import faultkit as fk

ARGS = ("--decoder", "pil", "--precision", "fp32", "--batch-size", "8")


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, shipped) -> tuple[Path, Path]:
    """(data, cache) of one clean run on 20 real photos: the reference every repaired cache must equal."""
    root = tmp_path_factory.mktemp("corrupt")
    data = make_subset(shipped, root / "data", 4)
    run_json("extract", data, "--cache-dir", root / "cache", *ARGS, timeout=300)
    return data, root / "cache"


def by_sha(rows: Rows) -> dict[str, np.ndarray]:
    return {h: rows.embeddings[i] for i, h in enumerate(rows.sha256)}


def damaged_copy(fresh: tuple[Path, Path], tmp_path: Path, damage) -> tuple[Path, Path]:
    """A copy of the fresh cache with `damage` done to its one shard."""
    data, cache = fresh
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    damage(fk.cache_for(copy).dir / fk.cache_for(copy).shards()[0])
    return data, copy


def truncate(h5: Path) -> None:
    h5.write_bytes(h5.read_bytes()[: h5.stat().st_size // 2])


def scribble_on_embeddings(h5: Path) -> None:
    """Overwrite bytes in the middle of the first embeddings chunk: only fletcher32 can tell."""
    with h5py.File(h5, "r") as f:
        info = f["embeddings"].id.get_chunk_info(0)
    with open(h5, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(random.Random(0).randbytes(64))


def assert_rebuilt(fresh, cache: Path, stderr: str) -> None:
    said = [line for line in stderr.splitlines() if " is corrupt (" in line]
    assert len(said) == 1 and "moved to" in said[0], stderr
    assert len(list(cache.rglob("*.h5.corrupt-*"))) == 1
    want, got = by_sha(fk.read_rows(fresh[1])), by_sha(fk.read_rows(cache))
    assert got.keys() == want.keys()
    for h in want:
        np.testing.assert_allclose(got[h], want[h], rtol=0, atol=1e-5)


def test_a_truncated_shard_is_moved_aside_and_its_rows_recomputed(fresh, tmp_path):
    """A shard that does not open is found when a run reads the hashes: that run recomputes its rows."""
    data, cache = damaged_copy(fresh, tmp_path, truncate)
    proc = run_cli("extract", data, "--cache-dir", cache, *ARGS, "--json", timeout=300, check=True)
    assert json.loads(proc.stdout)["computed"] == 20
    assert_rebuilt(fresh, cache, proc.stderr)


def test_garbage_in_embeddings_is_found_when_they_are_read(fresh, tmp_path, capfd):
    """extract reads no embeddings (its cost does not grow with the cache); loading a training set reads them,
    fletcher32 fails, the shard is set aside and its rows are extracted again before the set is returned."""
    data, cache = damaged_copy(fresh, tmp_path, scribble_on_embeddings)
    feats = load_features(ExtractConfig(data, cache_dir=cache, decoder="pil", precision="fp32"), progress=False)
    assert feats.result.computed == 20 and feats.X.shape == (20, 1280)
    assert_rebuilt(fresh, cache, capfd.readouterr().err)


def dead_writer(cache: Path, rows: Rows) -> Path:
    """A writer that journaled `rows` and was killed (its journal's flock went with it); returns the journal."""
    c = fk.cache_for(cache).open()
    c.append(rows)
    c.close()
    return next(p for p in c.dir.glob("journal-*.fpj"))


def parts_of(rows: Rows, *cuts: slice) -> list[Rows]:
    return [rows.take(range(len(rows))[s]) for s in cuts]


def test_torn_journal_tail_is_ignored(fresh, tmp_path):
    """17 rows in a shard, 3 only in a dead writer's journal, then garbage (a kill mid-record): the rows count,
    the garbage does not, and the next run publishes them and deletes the journal."""
    data, old = fresh
    rows = fk.read_rows(old)
    head, tail = parts_of(rows, slice(0, 17), slice(17, None))
    cache = tmp_path / "cache"
    c = Cache(cache, fk.cache_for(old).key).open()
    c.append(head)
    c.publish()
    with open(dead_writer(cache, tail), "ab") as fh:
        fh.write(b"FPJ1" + random.Random(1).randbytes(300))
    assert sorted(c.read().sha256) == sorted(rows.sha256)
    res = run_json("extract", data, "--cache-dir", cache, *ARGS, timeout=300)
    assert res["computed"] == 0 and res["reused"] == 20
    assert sorted(fk.read_rows(cache).sha256) == sorted(rows.sha256) and not list(cache.rglob("journal-*"))


def test_records_after_a_torn_tail_are_read_back(fresh, tmp_path):
    """A run killed mid-record, then a run that journals more and is killed too: both runs' whole records are
    read. A record whose checksum holds but whose content does not parse ends a journal like a torn one."""
    old = fresh[1]
    rows = fk.read_rows(old)
    parts = parts_of(rows, slice(0, 10), slice(10, 15), slice(15, None))
    cache = tmp_path / "cache"
    c = Cache(cache, fk.cache_for(old).key).open()
    c.append(parts[0])
    c.publish()
    with open(dead_writer(cache, parts[1]), "ab") as fh:
        fh.write(b"FPJ1" + random.Random(1).randbytes(300))
    second = dead_writer(cache, parts[2])  # (opening published the first dead journal)
    assert sorted(c.read().sha256) == sorted(rows.sha256)
    bad = b"\xff\x00\x00\x00not json"
    with open(second, "ab") as fh:
        fh.write(struct.pack("<4sII", b"FPJ1", len(bad), zlib.crc32(bad)) + bad)
    assert sorted(c.read().sha256) == sorted(rows.sha256)


def test_a_cache_open_in_another_program_is_not_set_aside(fresh, tmp_path):
    """HDF5 locks a file open for writing; that is no corruption: exit 2, the file untouched."""
    data, cache = damaged_copy(fresh, tmp_path, lambda h5: None)
    h5 = fk.cache_for(cache).path  # the table
    hold = "import h5py, sys, time; f = h5py.File(sys.argv[1], 'r+'); print('open', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(h5)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        before = h5.read_bytes()  # (opening for writing set a flag in the superblock)
        proc = run_cli("extract", data, "--cache-dir", cache, *ARGS, timeout=300)
        after = h5.read_bytes()
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2 and "another program" in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not list(cache.glob("*.corrupt-*")) and after == before


def test_a_failing_disk_is_one_line_and_the_next_run_resumes(tmp_path, small_data):
    """Writes fail past a file-size limit (EFBIG, as a full disk fails with ENOSPC) after one whole journal record
    of 8 rows: one line, exit 2, no hang; the next run keeps those 8 rows and computes the other 12."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of failing it
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "featpipe", "extract", str(small_data), "--cache-dir", str(cache),
                           *ARGS, "--json"], preexec_fn=limit_file_size, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("featpipe: error: cannot write") and last.endswith(": File too large"), last
    res = run_json("extract", small_data, "--cache-dir", cache, *ARGS, timeout=300)
    assert (res["computed"], res["reused"]) == (12, 8)


def popen(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "featpipe", "extract", *map(str, args), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out), err


def test_two_runs_of_the_same_images_at_once(tmp_path, shipped):
    """Neither waits for the other; what both embedded is in the cache once (reader and plain h5py alike)."""
    data = make_subset(shipped, tmp_path / "data", 12)
    cache = tmp_path / "cache"
    runs = [popen(data, "--cache-dir", cache, *ARGS) for _ in range(2)]
    (a, _), (b, _) = (finish(p) for p in runs)
    assert a["computed"] + b["computed"] >= 60 and a["computed"] + a["reused"] == 60
    rows = fk.read_rows(cache)
    assert len(rows) == len(set(rows.sha256)) == 60
    with h5py.File(a["cache_file"], "r") as f:
        assert len(set(f["sha256"][:])) == len(f["sha256"]) == 60


def test_two_runs_of_different_images_write_at_once(tmp_path, shipped):
    """Two writers of one cache key (two machines on a shared cache dir): both publish, nothing lost."""
    halves = [make_subset(shipped, tmp_path / f"data{i}", 12) for i in range(2)]
    for i, d in enumerate(halves):  # distinct bytes in each half: one byte appended to every file of the second
        for p in d.rglob("*.jpg"):
            p.write_bytes(p.read_bytes() + bytes(i))
    cache = tmp_path / "cache"
    runs = [popen(d, "--cache-dir", cache, *ARGS) for d in halves]
    (a, _), (b, _) = (finish(p) for p in runs)
    assert a["computed"] == b["computed"] == 60
    rows = fk.read_rows(cache)
    assert len(rows) == len(set(rows.sha256)) == 120
    with h5py.File(a["cache_file"], "r") as f:
        assert len(set(f["sha256"][:])) == len(f["sha256"]) == 120


def test_two_backbones_run_side_by_side(small_data, tmp_path):
    cache = tmp_path / "cache"
    runs = [popen(small_data, "--cache-dir", cache, "--backbone", b, *ARGS)
            for b in ("mobilenet_v2", "efficientnet_lite0")]
    (a, err_a), (b, err_b) = (finish(p) for p in runs)
    assert a["cache_file"] != b["cache_file"] and a["computed"] == b["computed"] == 20
    assert "waiting" not in err_a + err_b


def test_changed_deleted_and_other_backbone(small_data, tmp_path):
    cfg = ExtractConfig(small_data, cache_dir=tmp_path / "cache", decoder="pil", precision="fp32")
    first = extract(cfg)
    assert first.computed == 20
    changed, gone = sorted(small_data.glob("*/*.jpg"))[:2]
    changed.write_bytes(changed.read_bytes() + b"\0")  # same picture, new bytes: a new row
    gone.unlink()
    again = extract(cfg)
    assert again.computed == 1 and again.reused == 18
    assert str(gone) not in {m.path for m in again.members} and len(again.members) == 19
    other = extract(ExtractConfig(small_data, backbone="efficientnet_lite0", cache_dir=cfg.cache_dir,
                                  decoder="pil", precision="fp32"))
    assert other.cache_file != first.cache_file and other.computed == 19
