"""The embedding cache (format 2): per key, a directory of immutable HDF5 shards, and one small HDF5 file of
virtual datasets that shows them to plain h5py as a single table.

    <cache dir>/<key>.h5             the table: virtual `embeddings`, `sha256`, `path`, `label` over every live
                                     shard; its `shards` attribute is the manifest. Holds no rows; replaced whole.
    <cache dir>/<key>/<id>.h5        a shard: up to SHARD_ROWS rows sorted by sha256, never modified once published
    <cache dir>/<key>/journal-*.fpj  one per running writer: CRC-checked batches, flushed per batch
    <cache dir>/<key>/publish.lock   held while shards and the table are published (seconds, not a whole run)

Crash safety: a batch counts once it is in a journal. At the end of a run (or every SHARD_ROWS rows) the journal
becomes a shard: shard written to .tmp, fsynced, renamed; then the table likewise; then the journal deleted. A kill
at any step leaves the old table or the new one. A dead writer's journal (its flock released by the kernel) is
published by the next writer; shard files the manifest does not list (a publish or compact killed half-way) are
deleted under the lock. Readers take no lock: they read the table, the shards it lists and every journal.

Concurrent writers: a writer appends only rows whose hash the cache lacked when it opened; publication drops the
hashes that shards published since then already hold, so no two shards share a hash and the table never shows a
row twice. embeddings and sha256 carry fletcher32 checksums: garbage in a shard is an error on read, never floats.
"""

from __future__ import annotations

import binascii
import errno
import fcntl
import json
import os
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from featpipe import __version__, journal
from featpipe.errors import UserError, first_line
from featpipe.preprocess import Preprocessing
from featpipe.rows import Rows

FORMAT_VERSION = 2
SHARD_ROWS = 65536  # a shard's rows: few files at 10^7 images, and one shard held in memory stays ~0.3 GiB
CHUNK_ROWS = 16  # embeddings chunk: reading one row reads (and checksums) this many, not a whole shard
_STRINGS = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class CacheKey:
    backbone: str
    weights_sha256: str
    preprocessing: Preprocessing
    dim: int
    precision: str = "fp32"  # bf16 rows are other numbers than fp32 rows: never the same table

    def name(self) -> str:
        return f"{self.backbone}-{self.weights_sha256[:12]}-{self.preprocessing.digest()[:8]}-{self.precision}"

    def format1_name(self) -> str:
        return f"{self.backbone}-{self.weights_sha256[:12]}-{self.preprocessing.digest()[:8]}.h5"

    def attrs(self) -> dict:
        return {"backbone": self.backbone, "weights_sha256": self.weights_sha256,
                "preprocessing": self.preprocessing.to_json(), "dim": self.dim, "precision": self.precision}


class Hashes:
    """Which sha256 a cache holds: one sorted array of raw 32-byte digests (no Python object per row)."""

    def __init__(self, hex_digests: np.ndarray):
        v = np.sort(_raw(hex_digests))  # np.unique sorts bytes several times slower
        self.sorted = v[np.concatenate([[True], v[1:] != v[:-1]])] if len(v) else v
        self.added: set[str] = set()  # hashes a run queued after opening (identical files embed once)

    def __contains__(self, digest) -> bool:
        if digest is None:
            return False
        if digest in self.added:
            return True
        b = bytes.fromhex(digest)  # one scalar per file: cheaper than isin's arrays
        i = int(np.searchsorted(self.sorted, b))
        return i < len(self.sorted) and self.sorted[i] == b.rstrip(b"\0")  # numpy hands values out NUL-stripped

    def add(self, digest: str) -> None:
        self.added.add(digest)

    def isin(self, hex_digests: np.ndarray) -> np.ndarray:
        raw = _raw(hex_digests)
        if not len(self.sorted):
            return np.zeros(len(raw), bool)
        i = np.minimum(np.searchsorted(self.sorted, raw), len(self.sorted) - 1)
        return self.sorted[i] == raw  # (S32 compares whole arrays bytewise: digests ending in 0x00 included)

    def __len__(self) -> int:
        return len(self.sorted) + len(self.added)


def _raw(hex_digests) -> np.ndarray:
    """S64 hex -> S32 raw digests: half the memory of the column as stored."""
    hexes = np.ascontiguousarray(hex_digests, "S64")
    return np.frombuffer(binascii.unhexlify(hexes.tobytes()), "S32") if len(hexes) else np.empty(0, "S32")


class _Broken(Exception):
    """A shard that does not open or fails its checksums (the cause says how)."""


class _Vanished(Exception):
    """A listed shard was deleted under a reader (a compact replaced it): read the manifest again."""


class RowsGone(KeyError):
    """Rows a reader asked for are not there: never cached, or gone since its run looked (a shard set aside as
    corrupt, an unreferenced row dropped by a concurrent compact). Extracting again recomputes them."""


class Cache:
    def __init__(self, cache_dir: Path, key: CacheKey):
        self.root, self.key = Path(cache_dir), key
        self.path = self.root / f"{key.name()}.h5"  # the table
        self.dir = self.root / key.name()
        self.writable = True  # open() finds out
        self._seen: set[str] = set()  # shards whose hashes this writer has already excluded from its journal
        self._sha: dict[str, np.ndarray] = {}  # shard -> its sorted sha256 column, read once
        self._journal: Path | None = None
        self._journal_fh = None
        self._journal_rows = 0
        self._lock_depth = 0  # the publish lock is re-entrant within this object (flock is not, across fds)

    # ---- opening -------------------------------------------------------------------------------------------
    def open(self) -> "Cache":
        """Find out whether this process may write; if so, convert a format-1 file and publish dead writers'
        journals. Remembers the live shards: append() is for rows none of them holds."""
        self.writable = _writable_dir(self.root)
        if self.writable:
            try:
                self.dir.mkdir(exist_ok=True)
                self.writable = os.access(self.dir, os.W_OK)
            except PermissionError:
                self.writable = False
        legacy = self.root / self.key.format1_name()
        if legacy.exists() and not self.writable:
            raise UserError(f"cache {legacy} is in format 1 and {self.root} is read-only: run featpipe extract once "
                            f"with write access to convert it")
        if self.writable:
            with self._publish_lock():
                if legacy.exists():
                    self._convert_format1(legacy)
                self._adopt_journals()
        self._seen = set(self.shards())
        return self

    def close(self) -> None:
        if self._journal_fh is not None:
            self._journal_fh.close()  # releases its flock: an unpublished journal is adopted by the next writer
            self._journal_fh = None

    def __enter__(self) -> "Cache":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- reading -------------------------------------------------------------------------------------------
    def shards(self) -> list[str]:
        """The manifest: live shard names, in table order."""
        return [name for name, _ in self._manifest()]

    def _manifest(self) -> list[tuple[str, int]]:
        if not self.path.exists():
            return []
        try:
            with h5py.File(self.path, "r") as f:
                _check_attrs(f, self.key)
                return [(str(n), int(r)) for n, r in json.loads(f.attrs["shards"])]
        except (BlockingIOError, PermissionError) as e:  # a healthy file we may not open now: never set it aside
            raise UserError(f"cannot open cache {self.path}: {e.strerror or e} (is another program holding it "
                            f"open for writing?)") from None
        except (OSError, KeyError, ValueError, TypeError) as e:
            return self._rebuild_table(e)

    def _rebuild_table(self, why: Exception) -> list[tuple[str, int]]:
        """The table holds no rows, only which shards are live: rebuild it from the shard files (a shard whose
        hashes an earlier one already holds, a compact's leftover, stays out)."""
        print(f"featpipe: cache table {self.path.name} is unreadable ({type(why).__name__}: "
              f"{first_line(why)[:100]}); rebuilding it from its shards", file=sys.stderr)
        live, cols = [], []
        for p in sorted(self.dir.glob("*.h5")):
            try:
                sha = self._shard_sha256(p.name)
            except _Broken:
                continue  # not listed, so the next publish deletes it; its rows are recomputed
            if sha is not None and len(sha) and not Hashes(np.concatenate([*cols, sha[:0]])).isin(sha).any():
                live.append((p.name, len(sha)))
                cols.append(sha)
        if self.writable:
            with self._publish_lock():
                self._write_table(live)
        return live

    def hashes(self) -> Hashes:
        """Every hash the cache holds (shards and journals), reading only the sha256 columns."""
        return self._retry(self._hashes)

    def _retry(self, fn, *args):
        """Readers take no lock: a shard a compact just replaced, or rows a writer just moved from its journal to
        a shard, are found by reading the manifest again."""
        for _ in range(3):
            try:
                return fn(*args)
            except _Vanished:
                continue
        return fn(*args, final=True)

    def _hashes(self, final: bool = False) -> Hashes:
        cols = [self._sha256(name) for name in self.shards()]
        cols += [np.array(r.sha256, "S64") for r in self._journal_rows_all()]
        return Hashes(np.concatenate(cols) if cols else np.empty(0, "S64"))

    def _sha256(self, name: str) -> np.ndarray:
        if name not in self._sha:
            try:
                sha = self._shard_sha256(name)
            except _Broken as e:
                self.set_aside(name, e.__cause__)
                sha = np.empty(0, "S64")
            if sha is None:
                raise _Vanished(name)
            self._sha[name] = sha
        return self._sha[name]

    def _shard_sha256(self, name: str) -> np.ndarray | None:
        try:
            with h5py.File(self.dir / name, "r") as f:
                _check_attrs(f, self.key)
                sha = f["sha256"][:]
                if f["embeddings"].shape != (len(sha), self.key.dim):
                    raise ValueError("column lengths differ")
                return sha
        except FileNotFoundError:
            return None
        except (BlockingIOError, PermissionError) as e:
            raise UserError(f"cannot open cache shard {self.dir / name}: {e.strerror or e} (is another program "
                            f"holding it open for writing?)") from None
        except (OSError, KeyError, ValueError) as e:
            raise _Broken() from e

    def embeddings(self, sha256: list[str]) -> np.ndarray:
        """float32 (len(sha256), dim) for hashes the cache holds, reading only those rows. A shard that fails its
        checksums is set aside and RowsGone raised (extract recomputes its rows)."""
        return self._retry(self._embeddings, sha256)

    def _embeddings(self, sha256: list[str], final: bool = False) -> np.ndarray:
        want = np.asarray(sha256, "S64")
        out = np.empty((len(want), self.key.dim), np.float32)
        found = np.zeros(len(want), bool)
        for name in self.shards():
            sha = self._sha256(name)
            pos = np.minimum(np.searchsorted(sha, want), max(len(sha) - 1, 0))
            hit = ~found & (sha[pos] == want) if len(sha) else np.zeros(len(want), bool)
            if hit.any():
                out[hit] = self._read_rows(name, pos[hit])
                found |= hit
        if not found.all():
            rows = Rows.concat(self._journal_rows_all(), self.key.dim)
            index = {h: i for i, h in enumerate(rows.sha256)}
            for i in np.flatnonzero(~found):
                j = index.get(want[i].decode())
                if j is None and not final:
                    raise _Vanished(want[i].decode())
                if j is None:
                    raise RowsGone(f"{want[i].decode()} is not in the cache")
                out[i] = rows.embeddings[j]
        return out

    def _read_rows(self, name: str, pos: np.ndarray) -> np.ndarray:
        uniq, inverse = np.unique(pos, return_inverse=True)
        try:
            with h5py.File(self.dir / name, "r") as f:
                ds = f["embeddings"]
                if len(uniq) > len(ds) // 8:  # many rows: one sequential read beats a selection per row
                    return ds[:][pos]
                return ds[uniq][inverse]
        except OSError as e:
            self.set_aside(name, e)
            raise RowsGone(f"cache shard {name} is corrupt: set aside") from None

    def read(self) -> Rows:
        """Every row (shards, then journal rows no shard holds). Holds them all: for tests and small caches."""
        parts = []
        for name in self.shards():
            try:
                with h5py.File(self.dir / name, "r") as f:
                    parts.append(_rows_of(f))
            except OSError as e:
                self.set_aside(name, e)
        return Rows.concat(parts + self._journal_rows_all(), self.key.dim).unique()

    def set_aside(self, name: str, why: Exception) -> None:
        """Move a broken shard out of the manifest and out of the way; its rows are recomputed when next needed."""
        self._sha[name] = np.empty(0, "S64")
        if not self.writable:
            print(f"featpipe: cache shard {self.dir / name} is unreadable ({type(why).__name__}); ignoring it",
                  file=sys.stderr)
            return
        aside = f"{name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        with self._publish_lock():
            try:
                os.replace(self.dir / name, self.dir / aside)
            except FileNotFoundError:
                pass
            self._write_table([(n, r) for n, r in self._manifest() if n != name])
        print(f"featpipe: cache shard {self.key.name()}/{name} is corrupt ({type(why).__name__}: "
              f"{first_line(why)[:120]}); moved to {aside}, its rows will be recomputed", file=sys.stderr)

    # ---- journals ------------------------------------------------------------------------------------------
    def append(self, rows: Rows) -> None:
        """Journal one batch (rows the cache lacked at open()); flushed before returning, so a SIGKILL after this
        call keeps it. Every SHARD_ROWS rows the journal is published as a shard."""
        if not self.writable:
            raise UserError(f"cache dir {self.root} is not writable and this run has new images to embed; "
                            f"pass --cache-dir to a writable folder")
        if self._journal_fh is None:
            self._journal, self._journal_fh = journal.create(self.dir)
        self._journal_fh.write(journal.encode(rows))
        self._journal_fh.flush()
        self._journal_rows += len(rows)
        if self._journal_rows >= SHARD_ROWS:
            self.publish()

    def _journal_rows_all(self) -> list[Rows]:
        return [r for p in sorted(self.dir.glob(journal.PATTERN)) for r in journal.read(p, self.key.dim)]

    def _adopt_journals(self) -> None:
        """Publish the journals whose writers are gone (their flock is free); called under the publish lock."""
        dead = journal.dead(self.dir)
        if not dead:
            return
        rows = Rows.concat([r for p, _ in dead for r in journal.read(p, self.key.dim)], self.key.dim)
        self._publish_rows(rows, self._held(self.shards()))
        for p, fd in dead:
            p.unlink(missing_ok=True)
            os.close(fd)

    # ---- publishing ----------------------------------------------------------------------------------------
    def publish(self) -> None:
        """This writer's journal becomes a shard (if it holds rows no shard has since gained), then is deleted."""
        if self._journal_fh is None:
            return
        rows = Rows.concat(journal.read(self._journal, self.key.dim), self.key.dim)
        with self._publish_lock():
            newer = [n for n in self.shards() if n not in self._seen]
            self._publish_rows(rows, self._held(newer))
            self._seen = set(self.shards())
            self._journal.unlink()
        self._journal_fh.close()
        self._journal_fh, self._journal_rows = None, 0

    def _publish_rows(self, rows: Rows, held: Hashes) -> None:
        """Shards of the rows `held` lacks, then the table listing them (under the publish lock)."""
        rows = rows.unique()
        rows = rows.take(np.flatnonzero(~held.isin(np.array(rows.sha256, "S64")))) if len(rows) else rows
        manifest = self._manifest()
        live = {n for n, _ in manifest}
        for p in self.dir.glob("*.h5"):  # leftovers of a killed publish or compact: only we write now
            if p.name not in live:
                p.unlink()
        for p in self.dir.glob("*.tmp"):
            if not p.name.startswith(".journal-"):
                p.unlink()
        if not len(rows) and self.path.exists():
            return
        for start in range(0, len(rows), SHARD_ROWS):
            manifest.append(self._write_shard(rows.take(range(start, min(start + SHARD_ROWS, len(rows))))))
        self._write_table(manifest)

    def _write_shard(self, rows: Rows) -> tuple[str, int]:
        self._check_space(rows)
        order = np.argsort(np.array(rows.sha256, "S64"), kind="stable")
        rows = rows.take(order)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.h5"  # names sort in publication order
        tmp = self.dir / f"{name}.tmp"
        n, dim = len(rows), self.key.dim
        with h5py.File(tmp, "w") as f:
            _set_attrs(f, self.key)
            f.create_dataset("embeddings", data=rows.embeddings.reshape(n, dim).astype(np.float32, copy=False),
                             chunks=(max(1, min(n, CHUNK_ROWS)), dim), fletcher32=True)
            f.create_dataset("sha256", data=np.array(rows.sha256, "S64"), chunks=(max(1, min(n, 4096)),),
                             fletcher32=True)
            f.create_dataset("path", data=_os_bytes(rows.paths), dtype=_STRINGS)
            f.create_dataset("label", data=_os_bytes(rows.labels), dtype=_STRINGS)
        _fsync_replace(tmp, self.dir / name)
        self._sha[name] = np.array(rows.sha256, "S64")
        return name, n

    def _write_table(self, manifest: list[tuple[str, int]]) -> None:
        """The virtual datasets over every live shard (relative paths: the cache dir can move)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        total, dim = sum(r for _, r in manifest), self.key.dim
        with h5py.File(tmp, "w") as f:
            _set_attrs(f, self.key)
            f.attrs["shards"] = json.dumps(manifest)
            f.attrs["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            for col, dtype, shape in (("embeddings", np.float32, (dim,)), ("sha256", "S64", ()),
                                      ("path", _STRINGS, ()), ("label", _STRINGS, ())):
                if not total:
                    f.create_dataset(col, shape=(0, *shape), dtype=dtype)
                    continue
                layout, at = h5py.VirtualLayout(shape=(total, *shape), dtype=dtype), 0
                for name, rows in manifest:
                    layout[at:at + rows] = h5py.VirtualSource(f"{self.dir.name}/{name}", col, shape=(rows, *shape))
                    at += rows
                f.create_virtual_dataset(col, layout)
        _fsync_replace(tmp, self.path)

    @contextmanager
    def _publish_lock(self) -> Iterator[None]:
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        fd = os.open(self.dir / "publish.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"featpipe: waiting for another run publishing to {self.key.name()} …", file=sys.stderr)
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_depth = 1
            yield
        finally:
            self._lock_depth = 0
            os.close(fd)

    def _check_space(self, rows: Rows) -> None:
        """HDF5 running out of disk mid-write can take the process down with it (a segfault in h5py's cleanup,
        seen here): refuse before writing. The journal still holds the run's rows for the next try."""
        need = rows.embeddings.nbytes + sum(64 + len(p) + len(lbl) for p, lbl in zip(rows.paths, rows.labels))
        free = shutil.disk_usage(self.dir).free
        if free < need + (1 << 20):
            raise OSError(errno.ENOSPC, f"no space left for the cache: about {need / 2**20:.1f} MiB needed, "
                                        f"{free / 2**20:.1f} MiB free")

    # ---- maintenance ---------------------------------------------------------------------------------------
    def info(self) -> dict:
        manifest = self._manifest()
        files = [self.path, *(self.dir / n for n, _ in manifest), *self.dir.glob(journal.PATTERN)]
        return {"key": self.key.name(), "backbone": self.key.backbone, "precision": self.key.precision,
                "dim": self.key.dim, "weights_sha256": self.key.weights_sha256, "table": str(self.path),
                "rows": sum(r for _, r in manifest), "shards": len(manifest),
                "journal_rows": sum(len(r) for r in self._journal_rows_all()),
                "bytes": sum(p.stat().st_size for p in files if p.exists())}

    def compact(self, live: Hashes | None, spare: list[str] = ()) -> dict:
        """Rewrite the shards that are small or hold rows outside `live` (None: keep every row; shards in `spare`
        keep theirs) into full shards, switch the table to them, delete the old ones. A kill leaves the old table
        or the new one; the files the live table does not list are deleted by the next publish."""
        before = self.info()
        with self._publish_lock():
            self._adopt_journals()
            keep, redo, stale = [], [], False
            for name, n in self._manifest():
                dead = live is not None and name not in spare and not live.isin(self._sha256(name)).all()
                stale |= dead
                (redo if dead or n < SHARD_ROWS // 2 else keep).append((name, n))
            if not stale and len(redo) < 2:  # nothing to drop, nothing to merge
                return {**before, "dropped_rows": 0, "shards_after": before["shards"]}
            merged = self._merge(redo, live, spare)
            self._write_table(keep + merged)
            for name, _ in redo:
                (self.dir / name).unlink(missing_ok=True)
        after = self.info()
        return {**before, "dropped_rows": before["rows"] - after["rows"], "shards_after": after["shards"]}

    def _merge(self, shards: list[tuple[str, int]], live: Hashes | None, spare) -> list[tuple[str, int]]:
        """Their live rows as full shards, holding at most two shards' rows in memory."""
        out, pending = [], Rows.empty(self.key.dim)
        for name, _ in shards:
            try:
                with h5py.File(self.dir / name, "r") as f:
                    rows = _rows_of(f)
            except OSError as e:
                self.set_aside(name, e)
                continue
            if live is not None and name not in spare:
                rows = rows.take(np.flatnonzero(live.isin(np.array(rows.sha256, "S64"))))
            pending = Rows.concat([pending, rows], self.key.dim)
            while len(pending) >= SHARD_ROWS:
                out.append(self._write_shard(pending.take(range(SHARD_ROWS))))
                pending = pending.take(range(SHARD_ROWS, len(pending)))
        if len(pending):
            out.append(self._write_shard(pending))
        return out

    # ---- format 1 ------------------------------------------------------------------------------------------
    def _convert_format1(self, legacy: Path) -> None:
        """Today's shards from a format-1 file (and its journal), read SHARD_ROWS rows at a time; then it goes."""
        format1_journal = legacy.with_suffix(".journal")
        n = 0
        try:
            with h5py.File(legacy, "r") as f:
                _check_attrs(f, self.key, skip=("precision",))
                for start in range(0, len(f["sha256"]), SHARD_ROWS):
                    rows = _rows_of(f, slice(start, start + SHARD_ROWS))
                    self._publish_rows(rows, self._held(self.shards()))
                    n += len(rows)
        except (BlockingIOError, PermissionError) as e:
            raise UserError(f"cannot open cache {legacy}: {e.strerror or e} (is another program holding it open "
                            f"for writing?)") from None
        except (OSError, KeyError, ValueError) as e:
            aside = legacy.with_name(f"{legacy.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(legacy, aside)
            print(f"featpipe: cache {legacy.name} is corrupt ({type(e).__name__}: {first_line(e)[:120]}); moved to "
                  f"{aside.name}, rebuilding", file=sys.stderr)
        rows = Rows.concat(journal.read(format1_journal, self.key.dim), self.key.dim)
        self._publish_rows(rows, self._held(self.shards()))
        print(f"featpipe: converted cache {legacy.name} (format 1, {n + len(rows)} rows) to format 2: "
              f"{self.path.name} and its shards in {self.dir.name}/", file=sys.stderr)
        legacy.unlink(missing_ok=True)
        format1_journal.unlink(missing_ok=True)
        legacy.with_suffix(".lock").unlink(missing_ok=True)

    def _held(self, shards: list[str]) -> Hashes:
        return Hashes(np.concatenate([self._sha256(n) for n in shards] or [np.empty(0, "S64")]))


def tables(cache_dir: Path) -> Iterator[tuple[Path, CacheKey | None]]:
    """Every cache table under cache_dir with its key (None: a format-1 file, or not featpipe's)."""
    for p in sorted(Path(cache_dir).glob("*.h5")):
        try:
            with h5py.File(p, "r") as f:
                a = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            key = CacheKey(a["backbone"], a["weights_sha256"], Preprocessing.from_json(a["preprocessing"]),
                           int(a["dim"]), a["precision"]) if a.get("format_version") == FORMAT_VERSION else None
        except (OSError, KeyError, ValueError):
            key = None
        yield p, key







def _rows_of(f: h5py.File, part: slice = slice(None)) -> Rows:
    """A shard's (or a format-1 file's) rows, all columns."""
    return Rows([h.decode() for h in f["sha256"][part]], f["embeddings"][part], _os_strings(f["path"][part]),
                _os_strings(f["label"][part]))


def _set_attrs(f: h5py.File, key: CacheKey) -> None:
    for k, v in {**key.attrs(), "featpipe_version": __version__, "format_version": FORMAT_VERSION}.items():
        f.attrs[k] = v


def _check_attrs(f: h5py.File, key: CacheKey, skip: tuple[str, ...] = ()) -> None:
    for k, v in key.attrs().items():
        got = f.attrs.get(k)
        got = got.decode() if isinstance(got, bytes) else got
        if k not in skip and got != v:
            raise ValueError(f"attribute {k} is {got!r}, expected {v!r}")


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)




def _os_bytes(names: list[str]) -> np.ndarray:
    """File names are bytes on Linux and may not be UTF-8 (Python holds those as surrogates, which UTF-8 cannot
    encode): store the original bytes, which are plain UTF-8 for every name that is valid UTF-8."""
    return np.array([n.encode("utf-8", "surrogateescape") for n in names], dtype=object)


def _os_strings(values) -> list[str]:
    """Inverse of _os_bytes: the same str the scan produced."""
    return [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v for v in values]


def _writable_dir(d: Path) -> bool:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create cache dir {d}: {e.strerror}") from None
    return os.access(d, os.W_OK) and not (os.geteuid() == 0 and _readonly_mount_or_mode(d))


def _readonly_mount_or_mode(d: Path) -> bool:
    """root ignores mode bits, but a user who made the folder read-only means it; so does a read-only mount."""
    st = os.stat(d)
    if not st.st_mode & 0o222:
        return True
    try:
        return bool(os.statvfs(d).f_flag & os.ST_RDONLY)
    except OSError as e:
        return e.errno == errno.EROFS
