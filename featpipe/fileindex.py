"""Which files are unchanged since the last run, so that a warm re-run need not read and hash them again.

Like git's index: a file counts as unchanged when its size, inode, mtime and ctime all match what the last run
recorded with its sha256. Every write sets ctime to the current time, and no tool can set it back, so a changed
file is always read again. A file is only recorded when its ctime was RACY_SECONDS old as it was read: a write
in the same timestamp tick as that read cannot then hide. The index is an SQLite table beside the caches (shared
by every backbone; a run looks up and writes only its own files' records, never the whole index); losing or
damaging it costs only hashing again.

A file that failed to decode keeps its reason in its record, so an unchanged corrupt file is reported again
without reading it (nor loading the model to find out). Reasons hold only for the decoders that gave them
(`decoders`: featpipe's and Pillow's versions and the --decoder asked for): after an upgrade, or with another
decoder, every such file is tried again.

A tar shard (tar_input.py) is judged the same way, by its own stat: each image member has a record under
`SHARD#MEMBER` with the shard's stamp, and the `tar_shards` table keeps the shard's list of samples (members,
labels, skip reasons), so an unchanged shard is listed again without opening it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

INDEX_NAME = "files.sqlite"
FORMAT1_NAME = "files.json"  # format 1's index: a hint only, deleted by the first save
RACY_SECONDS = 2  # above any filesystem's timestamp granularity (FAT's is 2 s)
FLUSH_ROWS = 10_000  # records held before they are written: memory stays bounded on a cold run of any size
_SCHEMA = ("CREATE TABLE IF NOT EXISTS files (path BLOB PRIMARY KEY, size INTEGER, ino INTEGER, mtime INTEGER, "
           "ctime INTEGER, sha256 TEXT, reason TEXT, decoders TEXT) WITHOUT ROWID")
_TAR_SCHEMA = ("CREATE TABLE IF NOT EXISTS tar_shards (path BLOB PRIMARY KEY, size INTEGER, ino INTEGER, "
               "mtime INTEGER, ctime INTEGER, samples BLOB) WITHOUT ROWID")
_COLUMNS = "size, ino, mtime, ctime, sha256, reason, decoders"


class Stamp(NamedTuple):
    """The fields of a stat that judge a file unchanged: what a driver ships with a file record and gets back."""

    st_size: int
    st_ino: int
    st_mtime_ns: int
    st_ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "Stamp":
        return cls(st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def _stamp(st: os.stat_result | Stamp) -> tuple[int, int, int, int]:
    ino = st.st_ino - (1 << 64) if st.st_ino >= 1 << 63 else st.st_ino  # SQLite integers are signed 64-bit
    return st.st_size, ino, st.st_mtime_ns, st.st_ctime_ns


def _key(path: Path) -> bytes:
    return os.fsencode(os.path.abspath(path))  # bytes: a non-UTF-8 name is a valid key too


class FileIndex:
    """The records of the files under `root` (one range query: a dict lookup per file beats a query per file
    five-fold), and this run's changes to them."""

    def __init__(self, cache_dir: Path, root: Path | None, decoders: str = "", writable: bool = True) -> None:
        self.path = Path(cache_dir) / INDEX_NAME
        self.decoders, self.writable = decoders, writable
        self.seen: set[bytes] = set()  # files this run stat'ed: the records under its root to keep
        self.reasons: dict[bytes, str] = {}  # unchanged files whose recorded decode failure still holds
        self._rows: list[tuple] = []  # records to write
        self._failures: list[tuple] = []  # (reason, decoders, path) updates to write after them
        self._forgotten: list[tuple] = []  # (low, high) ranges of records to delete before them
        self._listings: list[tuple] = []  # tar_shards rows to write after them
        self._lock = threading.Lock()  # the reader's threads share one connection
        self._db = self._connect()
        self.old: dict[bytes, tuple] = {}  # root None (tar shards): one shard's records at a time, by listing()
        if root is not None:
            low = os.fsencode(os.path.join(os.path.abspath(root), ""))
            self._load(low, low[:-1] + bytes([low[-1] + 1]))  # every path that starts with "<root>/"

    def _load(self, low: bytes, high: bytes) -> None:
        self.old.update((r[0], r[1:]) for r in self._query(f"SELECT path, {_COLUMNS} FROM files WHERE path >= ? "
                                                           f"AND path < ?", (low, high)))

    def _connect(self) -> sqlite3.Connection | None:
        if not self.writable and not self.path.exists():
            return None
        uri = f"file:{self.path}?mode={'rwc' if self.writable else 'ro'}"
        try:
            db = sqlite3.connect(uri, uri=True, timeout=60, check_same_thread=False)
            if self.writable:
                db.execute(_SCHEMA)
                db.execute(_TAR_SCHEMA)
            db.execute("SELECT 1 FROM files LIMIT 1").fetchall()
            return db
        except sqlite3.DatabaseError as e:
            if self.writable and "locked" not in str(e):
                print(f"featpipe: file index {self.path} is unreadable ({e}); starting a new one", file=sys.stderr)
                self.path.unlink(missing_ok=True)
                return self._connect()
            return None

    def _query(self, sql: str, args: tuple) -> list:
        if self._db is None:
            return []
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.DatabaseError:
                return []  # a damaged or busy index costs hashing again, never the run

    def unchanged(self, path: Path, st: os.stat_result) -> str | None:
        """The sha256 recorded for this file if it is unchanged since then."""
        key = _key(path)
        self.seen.add(key)
        row = self.old.get(key)
        if not row or tuple(row[:4]) != _stamp(st) or not isinstance(row[4], str):
            return None
        if row[5] and row[6] == self.decoders:
            self.reasons[key] = row[5]
        return row[4]

    def lookup(self, path: Path) -> tuple[os.stat_result | None, str | None, str | None]:
        """Stat only, no read: (stat or None, the recorded sha256 if the file is unchanged, why it failed to decode
        last time if it is unchanged and did fail)."""
        st = stat(path)
        digest = self.unchanged(path, st) if st else None
        return st, digest, self.failure(path) if digest is not None else None

    def failure(self, path: Path) -> str | None:
        """Why this file failed last time, if unchanged() just found it unchanged and it did fail."""
        return self.reasons.get(_key(path))

    def record_failure(self, path: Path, reason: str) -> None:
        """Keep why a recorded file could not be decoded (content-deterministic: same bytes, same decoders)."""
        self._queue(self._failures, (reason, self.decoders, _key(path)))

    def record(self, path: Path, st: os.stat_result | Stamp, sha256: str, read_at_ns: int) -> None:
        """Remember a file hashed now; `st` was taken before reading it, and `read_at_ns` (time.time_ns()) is no
        later than the read."""
        key = _key(path)
        self.seen.add(key)
        if st.st_ctime_ns < read_at_ns - RACY_SECONDS * 1_000_000_000:
            self._queue(self._rows, (key, *_stamp(st), sha256, None, None))

    def listing(self, shard: Path, st: os.stat_result) -> list[list] | None:
        """A tar shard's samples ([member, label, skip reason] each) as the last run listed them, if the shard is
        unchanged since. Its members' records are loaded for unchanged() then, in place of those loaded before (an
        index for shards is opened without a root)."""
        key = _key(shard)
        rows = self._query("SELECT size, ino, mtime, ctime, samples FROM tar_shards WHERE path = ?", (key,))
        if not rows or tuple(rows[0][:4]) != _stamp(st):
            return None
        self.old = {}  # the previous shard's records are done with: memory holds one shard's, not every sample's
        self._load(key + b"#", key + b"$")  # every SHARD#MEMBER
        try:
            return json.loads(zlib.decompress(rows[0][4]))
        except (zlib.error, ValueError, TypeError):
            return None  # a damaged listing costs reading the shard again

    def record_listing(self, shard: Path, st: os.stat_result, samples: list[list], read_at_ns: int) -> None:
        """Remember a tar shard's samples, read whole now (its members recorded with the same `read_at_ns`)."""
        if st.st_ctime_ns < read_at_ns - RACY_SECONDS * 1_000_000_000:
            blob = zlib.compress(json.dumps(samples).encode())
            self._queue(self._listings, (_key(shard), *_stamp(st), blob))

    def forget_members(self, shard: Path) -> None:
        """A tar shard read again: its members' old records go (the ones read now replace them)."""
        key = _key(shard)
        self._queue(self._forgotten, (key + b"#", key + b"$"))

    def _queue(self, pending: list, row: tuple) -> None:
        with self._lock:
            pending.append(row)
            full = len(self._rows) + len(self._failures) + len(self._listings) >= FLUSH_ROWS
        if full:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            forgotten, rows, failures, listings = self._forgotten, self._rows, self._failures, self._listings
            self._forgotten, self._rows, self._failures, self._listings = [], [], [], []
            if self._db is None or not self.writable or not (forgotten or rows or failures or listings):
                return
            try:
                with self._db:
                    self._db.executemany("DELETE FROM files WHERE path >= ? AND path < ?", forgotten)
                    self._db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                    self._db.executemany("UPDATE files SET reason = ?, decoders = ? WHERE path = ?", failures)
                    self._db.executemany("INSERT OR REPLACE INTO tar_shards VALUES (?, ?, ?, ?, ?, ?)", listings)
            except sqlite3.DatabaseError as e:
                print(f"featpipe: could not update the file index {self.path} ({e})", file=sys.stderr)

    def save(self, drop_gone: bool = True) -> None:
        """Write this run's records; drop the records under root of files this run did not find (unless it was
        given a list of files, not a whole folder: drop_gone=False)."""
        self.flush()
        if self._db is None or not self.writable:
            return
        gone = [(p,) for p in self.old if p not in self.seen] if drop_gone else []
        with self._lock:
            try:
                with self._db:
                    self._db.executemany("DELETE FROM files WHERE path = ?", gone)
            except sqlite3.DatabaseError as e:
                print(f"featpipe: could not update the file index {self.path} ({e})", file=sys.stderr)
        (self.path.parent / FORMAT1_NAME).unlink(missing_ok=True)


def indexed_hashes(cache_dir: Path) -> np.ndarray | None:
    """Every sha256 the index refers to (S64), or None when there is no index to trust."""
    path = Path(cache_dir) / INDEX_NAME
    if not path.exists():
        return None
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60) as db:
            rows = db.execute("SELECT DISTINCT sha256 FROM files")
            hashes = np.fromiter((r[0].encode() for r in rows), dtype="S64")
    except sqlite3.DatabaseError:
        return None
    return hashes if len(hashes) else None


def stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None
