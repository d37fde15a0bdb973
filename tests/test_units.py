"""Fast, in-process unit tests of the formats: the cache (shards, table, journals), the file index, the model bundle.
Real files, real h5py and safetensors; no subprocess, no model."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from featpipe import bundle as B
from featpipe.cache import Cache, RowsGone
from featpipe.cache_admin import compact_key
from featpipe.hashes import Hashes
from featpipe.shards import CacheKey
from featpipe.rows import Rows
from featpipe.errors import UserError
from featpipe.dataset import ImageFile, scan
from featpipe.fileindex import FileIndex
from featpipe.heads import Head
from featpipe.members import Members
from featpipe.preprocess import Preprocessing

KEY = CacheKey("mobilenet_v2", "ab" * 32, Preprocessing(256, 224, (0.5,) * 3, (0.5,) * 3, "bilinear"), 4)


def rows(n: int, start: int = 0) -> Rows:
    ids = range(start, start + n)
    emb = np.array([[i, i + 0.5, -i, np.sin(i)] for i in ids], np.float32).reshape(n, 4)  # a row is its id's
    return Rows([f"{i:064x}" for i in ids], emb, [f"/d/c{i % 2}/{i}.jpg" for i in ids], [f"c{i % 2}" for i in ids])


def same(a: Rows, b: Rows) -> bool:
    return a.sha256 == b.sha256 and a.paths == b.paths and a.labels == b.labels and \
        np.array_equal(a.embeddings, b.embeddings)


def table(cache: Cache) -> dict:
    """The table as plain h5py sees it (the README's snippet)."""
    with h5py.File(cache.path, "r") as f:
        return {k: f[k][:] for k in ("embeddings", "sha256", "path", "label")}


def test_cache_publishes_shards_that_h5py_reads_as_one_table(tmp_path):
    """Rows journaled then published read back exactly, through Cache and through the virtual table; a second
    run adds a shard and never rewrites the first."""
    with Cache(tmp_path, KEY) as c:
        c.append(rows(3))
        c.append(rows(2, start=3))
        c.publish()
        first = sorted(c.dir.glob("*.h5"))
    with Cache(tmp_path, KEY) as c:
        assert sorted(c.read().sha256) == rows(5).sha256
        c.append(rows(4, start=5))
        c.publish()
        assert len(c.shards()) == 2 and first[0].stat().st_mtime_ns == os.stat(first[0]).st_mtime_ns
    t = table(Cache(tmp_path, KEY))
    want = rows(9)
    order = np.argsort(t["sha256"])
    assert [h.decode() for h in t["sha256"][order]] == want.sha256
    np.testing.assert_array_equal(t["embeddings"][order], want.embeddings)
    assert [p.decode() for p in t["path"][order]] == want.paths
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("journal-*"))


def test_a_dead_writers_journal_is_read_and_then_published(tmp_path):
    """A writer that never publishes (a SIGKILL: its flock goes with it) leaves rows every reader sees; the next
    writer to open the cache publishes them and deletes the journal."""
    dead = Cache(tmp_path, KEY).open()
    dead.append(rows(3))
    live = Cache(tmp_path, KEY).open()  # the dead writer is still alive here: its journal is not taken
    assert len(list(live.dir.glob("journal-*.fpj"))) == 1 and len(live.shards()) == 0
    dead.close()
    assert sorted(Cache(tmp_path, KEY).read().sha256) == rows(3).sha256  # a reader, before anyone publishes
    with Cache(tmp_path, KEY) as c:
        assert len(c.shards()) == 1 and not list(c.dir.glob("journal-*"))
        assert sorted(c.read().sha256) == rows(3).sha256


def test_many_dead_writers_journals_are_published_a_group_at_a_time(tmp_path, monkeypatch):
    """Twenty dead writers (a killed cluster run) left 999 rows each, neighbours sharing 99: the next writer publishes
    them about SHARD_ROWS at a time, each hash once, holding one group in memory rather than every journal."""
    import tracemalloc

    from featpipe import cache as cache_module

    monkeypatch.setattr(cache_module, "SHARD_ROWS", 1000)
    key = CacheKey("mobilenet_v2", "ab" * 32, KEY.preprocessing, 256)
    rng = np.random.default_rng(0)
    writers = [Cache(tmp_path, key).open() for _ in range(20)]  # all alive at once, as a cluster's actors are
    for k, w in enumerate(writers):
        ids = range(900 * k, 900 * k + 999)
        w.append(Rows([f"{i:064x}" for i in ids], rng.random((999, 256), np.float32), [f"/d/{i}.jpg" for i in ids],
                      ["c"] * 999))
    for w in writers:
        w.close()  # its flock goes, its journal stays: a dead writer's
    journals = sum(p.stat().st_size for p in tmp_path.rglob("journal-*.fpj"))
    tracemalloc.start()
    with Cache(tmp_path, key) as c:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        sha = np.concatenate([c.shard_sha256(n) for n in c.shards()])
        assert len(sha) == len(set(sha)) == 900 * 19 + 999 and not list(c.dir.glob("journal-*"))
    assert peak < journals / 2, (peak, journals)


def test_embeddings_reads_the_rows_asked_for_in_their_order(tmp_path):
    with Cache(tmp_path, KEY) as c:
        c.append(rows(6))
        c.publish()
        c.append(rows(2, start=6))  # still in the journal
        ask = [rows(8).sha256[i] for i in (7, 0, 3, 3, 5)]
        np.testing.assert_array_equal(c.embeddings(ask), rows(8).embeddings[[7, 0, 3, 3, 5]])
        with pytest.raises(KeyError):
            c.embeddings([f"{99:064x}"])
        known = c.hashes()
        assert all(h in known for h in rows(8).sha256) and f"{99:064x}" not in known and None not in known


def test_concurrent_writers_never_publish_a_hash_twice(tmp_path):
    """Two writers open the same key, both embed rows 2-4 (same images at once): each hash is in one shard."""
    a, b = Cache(tmp_path, KEY).open(), Cache(tmp_path, KEY).open()
    a.append(rows(5))
    b.append(rows(5, start=2))
    b.publish()
    a.publish()
    t = table(Cache(tmp_path, KEY))
    assert sorted(h.decode() for h in t["sha256"]) == rows(7).sha256 and len(a.shards()) == 2


def test_keys_differ_by_weights_and_by_precision(tmp_path):
    from dataclasses import replace

    with Cache(tmp_path, KEY) as c:
        c.append(rows(2))
        c.publish()
    for other in (replace(KEY, weights_sha256="cd" * 32), replace(KEY, precision="bf16")):
        with Cache(tmp_path, other) as c:
            assert len(c.read()) == 0 and c.path != Cache(tmp_path, KEY).path


def test_compact_merges_small_shards_and_drops_unreferenced_rows(tmp_path):
    for start in (0, 3, 6):
        with Cache(tmp_path, KEY) as c:
            c.append(rows(3, start=start))
            c.publish()
    c = Cache(tmp_path, KEY).open()
    old = set(c.shards())
    live = Hashes(np.array(rows(8).sha256, "S64"))  # row 8 no longer referenced
    out = compact_key(c, live)
    assert (out["shards"], out["shards_after"], out["dropped_rows"]) == (3, 1, 1)
    assert not old & set(p.name for p in c.dir.glob("*.h5"))
    assert sorted(h.decode() for h in table(c)["sha256"]) == rows(8).sha256
    assert compact_key(c, live)["shards_after"] == 1  # nothing left to do
    with pytest.raises(RowsGone):  # a reader that counted on the dropped row: load_features extracts again
        c.embeddings([rows(9).sha256[8]])


@pytest.mark.parametrize("then", ["publish", "compact"])
def test_files_the_manifest_does_not_list_are_never_read_and_are_deleted(tmp_path, then):
    """A compact killed after writing its shard but before switching the table leaves a shard of rows the live
    shards hold too: no reader counts them twice, and the next publish or compact deletes the file."""
    with Cache(tmp_path, KEY) as c:
        c.append(rows(3))
        c.publish()
        stray = c.dir / "00000000000000000001-deadbeef.h5"
        stray.write_bytes(next(c.dir.glob("*.h5")).read_bytes())
        (c.dir / "x.h5.tmp").write_bytes(b"half")
        assert len(c.read()) == 3
        if then == "publish":
            c.append(rows(1, start=3))
            c.publish()
        else:
            assert compact_key(c, None)["shards_after"] == 1  # nothing to merge: only the leftovers go
    assert not stray.exists() and not list(c.dir.glob("*.tmp")) and len(table(c)["sha256"]) == 3 + (then == "publish")


def test_a_corrupt_shard_is_set_aside_alone(tmp_path, capsys):
    for start in (0, 3):
        with Cache(tmp_path, KEY) as c:
            c.append(rows(3, start=start))
            c.publish()
    bad = Cache(tmp_path, KEY).shards()[0]
    path = Cache(tmp_path, KEY).dir / bad
    path.write_bytes(path.read_bytes()[:1000])
    with Cache(tmp_path, KEY) as c:
        assert len(c.hashes()) == 3 and bad not in c.shards()
    assert "is corrupt" in capsys.readouterr().err and list(c.dir.glob(f"{bad}.corrupt-*"))


def test_the_table_is_rebuilt_from_the_shards(tmp_path):
    with Cache(tmp_path, KEY) as c:
        c.append(rows(4))
        c.publish()
    c.path.write_bytes(b"not hdf5")
    with Cache(tmp_path, KEY) as c:
        assert sorted(c.read().sha256) == rows(4).sha256
    assert len(table(c)["sha256"]) == 4


def test_a_format1_file_is_converted_on_first_open(tmp_path, capsys):
    old = tmp_path / KEY.format1_name()
    r = rows(5)
    with h5py.File(old, "w") as f:  # format 1's layout (README of featpipe 0.x)
        for k, v in {**KEY.attrs(), "format_version": 1}.items():
            if k != "precision":
                f.attrs[k] = v
        f["embeddings"], f["sha256"] = r.embeddings, np.array(r.sha256, "S64")
        f.create_dataset("path", data=np.array([p.encode() for p in r.paths], object), dtype=h5py.string_dtype())
        f.create_dataset("label", data=np.array([x.encode() for x in r.labels], object), dtype=h5py.string_dtype())
    with Cache(tmp_path, KEY) as c:
        assert sorted(c.read().sha256) == r.sha256 and not old.exists()
    assert "converted cache" in capsys.readouterr().err


def test_file_index_remembers_unchanged_files_only(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir(), cache.mkdir()
    f, g = data / "a.jpg", data / "b.jpg"
    f.write_bytes(b"x"), g.write_bytes(b"y")
    idx = FileIndex(cache, data, "v1")
    later = time.time_ns() + 10**12  # as if read long after the last change: not a racy record
    for p, h in ((f, "h1"), (g, "h2")):
        idx.record(p, os.stat(p), h, later)
    idx.save()
    again = FileIndex(cache, data, "v1")
    assert again.unchanged(f, os.stat(f)) == "h1"
    g.write_bytes(b"changed!")
    assert again.unchanged(g, os.stat(g)) is None  # size and times moved: read it again
    third = FileIndex(cache, data, "v1")
    assert third.unchanged(f, os.stat(f)) == "h1"
    g.unlink()
    third.save()  # a run that did not find g: its record goes, f's stays
    with sqlite3.connect(third.path) as db:
        assert db.execute("SELECT COUNT(*) FROM files").fetchone() == (1,)


@pytest.mark.parametrize("order", ["sorted", "as made"])
def test_file_index_holds_one_window_of_records_and_keeps_only_the_seen_ones_under_its_root(tmp_path, order):
    """A run over more files than one window, in a folder's order (range scans) or not (IN queries): every lookup
    finds its record while memory holds at most PREFETCH_ROWS of them, not the unlisted ones between; save() drops
    the records under root the run did not see, and no record outside root."""
    from featpipe import fileindex

    n = 2 * fileindex.PREFETCH_ROWS + 100
    root, elsewhere = tmp_path / "data", tmp_path / "other"
    stamp = fileindex.Stamp(1, 2, 3, 4)
    paths = [root / f"{i // 1000}" / f"{i}.jpg" for i in range(n)]
    paths = sorted(paths, key=lambda p: os.fsencode(p)) if order == "sorted" else paths
    digest = {p: f"{i:064x}" for i, p in enumerate(paths)}
    first = FileIndex(tmp_path, None)
    for p in paths + [elsewhere / "x.jpg"]:
        first.record(p, stamp, digest.get(p, "ee" * 32), 10**19)
    first.save()
    listed = [p for j, p in enumerate(paths[:-50]) if j % 100 != 7]  # the rest were deleted since
    run = FileIndex(tmp_path, root)
    most = 0
    for p in run.prefetching(listed, lambda p: p):
        assert run.unchanged(p, stamp) == digest[p]
        most = max(most, len(run.old))
    assert most == fileindex.PREFETCH_ROWS
    assert run.unchanged(paths[-1], stamp) == digest[paths[-1]]  # not prefetched: asked alone, found all the same
    run.save()
    with sqlite3.connect(run.path) as db:
        kept = {os.fsdecode(r[0]) for r in db.execute("SELECT path FROM files")}
    assert kept == {str(p) for p in listed + paths[-1:] + [elsewhere / "x.jpg"]}


def test_file_index_drops_nothing_it_could_not_note_as_seen_nor_another_runs_new_records(tmp_path, monkeypatch):
    """A flush that fails (another run holds the index past the busy timeout) must not make save() drop the
    records of the files looked up before it; records another run wrote for files made since this run began stay."""
    from featpipe import fileindex

    monkeypatch.setattr(fileindex, "BUSY_SECONDS", 0.1)
    root, stamp = tmp_path / "data", fileindex.Stamp(1, 2, 3, 4)
    paths = [root / f"{i}.jpg" for i in range(20)]
    first = FileIndex(tmp_path, None)
    for i, p in enumerate(paths):
        first.record(p, stamp, f"{i:064x}", 10**19)
    first.save()
    run = FileIndex(tmp_path, root)
    assert all(run.unchanged(p, stamp) == f"{i:064x}" for i, p in enumerate(paths))
    run.record_failure(paths[0], "not an image")
    with sqlite3.connect(run.path) as other:
        other.execute("BEGIN IMMEDIATE")
        run.flush()  # fails: locked
        other.rollback()
    later = FileIndex(tmp_path, None)  # another run, on a file made after this one began
    later.record(root / "new.jpg", fileindex.Stamp(1, 2, 3, time.time_ns()), "ff" * 32, 10**19)
    later.save()
    run.save()
    with sqlite3.connect(run.path) as db:
        assert db.execute("SELECT COUNT(*) FROM files").fetchone() == (21,)
    seen = FileIndex(tmp_path, root)  # a run that sees them all: new.jpg, made before it began and unseen, goes
    assert all(seen.unchanged(p, stamp) for p in paths)
    seen.save()
    with sqlite3.connect(seen.path) as db:
        assert db.execute("SELECT COUNT(*) FROM files").fetchone() == (20,)


def test_a_journal_record_claiming_more_bytes_than_the_file_ends_the_read_without_allocating_them(tmp_path):
    import struct
    import tracemalloc

    from featpipe import journal

    path = tmp_path / "journal-x.fpj"
    path.write_bytes(journal.encode(rows(3)) + struct.pack("<4sII", journal.MAGIC, 0xFFFFFFF0, 0) + b"\0" * 100)
    tracemalloc.start()
    back = journal.read(path, 4)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(back) == 1 and same(back[0], rows(3)) and peak < 10**6


def test_file_index_finds_a_file_however_its_path_is_spelled(tmp_path, monkeypatch):
    from featpipe.fileindex import Stamp

    monkeypatch.chdir(tmp_path)
    r, stamp = tmp_path / "r", Stamp(1, 2, 3, 4)
    pairs = [(Path(f"{r}/a/../b.jpg"), r / "b.jpg"), (f"{r}//c.jpg", r / "c.jpg"), (f"{r}/./d.jpg", r / "d.jpg"),
             (Path("r/e.jpg"), r / "e.jpg"), ("./r/f.jpg", Path(f"{r}/x/../f.jpg")),
             (f"{r}/\udcff.jpg", r / "\udcff.jpg")]
    first = FileIndex(tmp_path, None)
    for i, (spelled, _) in enumerate(pairs):
        first.record(spelled, stamp, f"{i:064x}", 10**19)
    first.save()
    again = FileIndex(tmp_path, None)
    assert [again.unchanged(other, stamp) for _, other in pairs] == [f"{i:064x}" for i in range(len(pairs))]


def test_file_index_drops_a_failure_recorded_by_other_decoders(tmp_path):
    f = tmp_path / "a.jpg"
    f.write_bytes(b"x")
    idx = FileIndex(tmp_path, tmp_path, "v1")
    idx.record(f, os.stat(f), "h", time.time_ns() + 10**12)
    idx.record_failure(f, "not an image")
    idx.save()
    same_decoders, other = FileIndex(tmp_path, tmp_path, "v1"), FileIndex(tmp_path, tmp_path, "v2")
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


def test_hashes_hold_raw_digests_whatever_their_last_bytes():
    """Digests are kept as 32 raw bytes; numpy strips trailing NULs from such values when it hands one out, so
    digests ending in 00 bytes must still be found, and not confused with one another."""
    ends = ["00" * 31 + "00", "ab" * 31 + "00", "ab" * 30 + "0000", "ab" * 31 + "01", "ff" * 32]
    h = Hashes(np.array(ends[:3], "S64"))
    assert all(d in h for d in ends[:3]) and not any(d in h for d in ends[3:]) and len(h) == 3
    assert h.isin(np.array(ends, "S64")).tolist() == [True, True, True, False, False]
    h.add(ends[4])
    assert ends[4] in h and None not in h


def test_a_flat_folder_given_as_dot_names_its_files_as_pathlib_does(tmp_path, monkeypatch):
    """`featpipe extract .`: rows say x.jpg, not ./x.jpg (the Ray engine's workers name them through pathlib)."""
    for name in ("b.jpg", "a.jpg"):
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert [f.path for f in scan(Path("."), labelled=False)[1]] == [str(Path(".") / n) for n in ("a.jpg", "b.jpg")]


def test_members_keep_files_and_raw_digests_and_read_back_whole():
    """extract's result: the scan's files and 32 bytes a digest, read back as (path, label, hex sha256)."""
    m = Members()
    for i, name in enumerate("bca"):
        m.append(ImageFile(f"/d/{name}.jpg", name.upper()), f"{i:064x}")
    assert [(x.path, x.label, x.sha256) for x in m] == [("/d/b.jpg", "B", f"{0:064x}"), ("/d/c.jpg", "C", f"{1:064x}"),
                                                        ("/d/a.jpg", "A", f"{2:064x}")]
    assert m[1:] == list(m)[1:] and len(m) == 3 and m.where(lambda sha: True) is m
    assert [x.path for x in m.where(lambda sha: sha != f"{1:064x}")] == ["/d/b.jpg", "/d/a.jpg"]
    assert [(x.path, x.sha256) for x in m.by_path()] == [("/d/a.jpg", f"{2:064x}"), ("/d/b.jpg", f"{0:064x}"),
                                                        ("/d/c.jpg", f"{1:064x}")]
