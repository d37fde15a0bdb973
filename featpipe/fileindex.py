"""Which files are unchanged since the last run, so that a warm re-run need not read and hash them again.

Like git's index: a file counts as unchanged when its size, inode, mtime and ctime all match what the last run
recorded with its sha256. Every write sets ctime to the current time, and no tool can set it back, so a changed
file is always read again. A file is only recorded when its ctime was RACY_SECONDS old as it was read: a write
in the same timestamp tick as that read cannot then hide. The index is an SQLite table beside the caches (shared
by every backbone; a run looks up and writes only its own files' records, never the whole index); losing or
damaging it costs only hashing again. Memory holds a window of records whatever the number of files: readers
look files up through prefetching(), and the files a run saw go to a temporary table, not a Python set.

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
import time
import zlib
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, TypeVar

import numpy as np

INDEX_NAME = "files.sqlite"
FORMAT1_NAME = "files.json"  # format 1's index: a hint only, deleted by the first save
RACY_SECONDS = 2  # above any filesystem's timestamp granularity (FAT's is 2 s)
FLUSH_ROWS = 10_000  # records held before they are written: memory stays bounded on a cold run of any size
PREFETCH_ROWS = 8192  # records loaded per window (well above a reader's read-ahead)
BUSY_SECONDS = 60  # how long a write waits for another run's transaction before it gives up
IN_KEYS = 500  # keys per IN (...) query: under SQLite's oldest limit on bound parameters (999)
_SCHEMA = ("CREATE TABLE IF NOT EXISTS files (path BLOB PRIMARY KEY, size INTEGER, ino INTEGER, mtime INTEGER, "
           "ctime INTEGER, sha256 TEXT, reason TEXT, decoders TEXT) WITHOUT ROWID")
_TAR_SCHEMA = ("CREATE TABLE IF NOT EXISTS tar_shards (path BLOB PRIMARY KEY, size INTEGER, ino INTEGER, "
               "mtime INTEGER, ctime INTEGER, samples BLOB) WITHOUT ROWID")
_COLUMNS = "size, ino, mtime, ctime, sha256, reason, decoders"
_SEEN_SCHEMA = "CREATE TEMP TABLE IF NOT EXISTS seen (path BLOB PRIMARY KEY) WITHOUT ROWID"
_ASK = object()  # a key prefetching() did not load: one query
T = TypeVar("T")


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


def _key(path: str | Path) -> bytes:
    """abspath's bytes (a non-UTF-8 name is a valid key too). An absolute path without "//", "/." or a trailing "/"
    is its own abspath: scanned files are, and abspath costs a lookup's worth of time."""
    s = os.fspath(path)
    if s.startswith("/") and "//" not in s and "/." not in s and not s.endswith("/"):
        return os.fsencode(s)
    return os.fsencode(os.path.abspath(s))


class FileIndex:
    """The records of the files a run looks up, a window at a time (prefetching(): a range scan or a few IN
    queries per window beat a query per file), and this run's changes to them."""

    def __init__(self, cache_dir: Path, root: Path | None, decoders: str = "", writable: bool = True) -> None:
        """`root`: the folder whose files the run lists (a scanned folder, a label file's), whose records of files
        it did not see save() drops (None: given files, or tar shards, whose members are kept per shard)."""
        self.path = Path(cache_dir) / INDEX_NAME
        self.decoders, self.writable = decoders, writable
        self._rows: list[tuple] = []  # records to write
        self._failures: list[tuple] = []  # (reason, decoders, path) updates to write after them
        self._forgotten: list[tuple] = []  # (low, high) ranges of records to delete before them
        self._listings: list[tuple] = []  # tar_shards rows to write after them
        self._seen: list[tuple] = []  # (path,) of files stat'ed outside a window, to note at the next flush
        self._seen_lost = False  # some files this run saw could not be noted: save() then drops nothing
        self._started_ns = time.time_ns()  # save() keeps the records of files made since (another run's)
        self._lock = threading.Lock()  # the reader's threads share one connection
        self._db = self._connect()
        self.old: dict[bytes, tuple | None] = {}  # the loaded window: a file's record, or None if it has none
        self._under: tuple[bytes, bytes] | None = None
        if root is not None:
            low = os.fsencode(os.path.join(os.path.abspath(root), ""))
            self._under = low, low[:-1] + bytes([low[-1] + 1])  # every path that starts with "<root>/"

    def prefetching(self, items: Iterable[T], path: Callable[[T], Path]) -> Iterator[T]:
        """`items` as given, the records of each next PREFETCH_ROWS loaded before they are yielded (in place of the
        window before: the few lookups of it still in flight ask one query each)."""
        it = iter(items)
        while chunk := list(islice(it, PREFETCH_ROWS)):
            keys = [_key(path(i)) for i in chunk]
            self.old = self._window(keys)
            self._note_seen([(k,) for k in keys])  # each will be looked up
            yield from chunk

    def _window(self, keys: list[bytes]) -> dict[bytes, tuple | None]:
        """The records of `keys`: one range scan when they are in order (a folder's files, listed sorted) and the
        range holds few others, else IN queries."""
        window: dict[bytes, tuple | None] = dict.fromkeys(keys)
        if all(a < b for a, b in zip(keys, keys[1:])):
            rows = self._query(f"SELECT path, {_COLUMNS} FROM files WHERE path >= ? AND path <= ? LIMIT ?",
                               (keys[0], keys[-1], 2 * len(keys)))
            if len(rows) < 2 * len(keys):
                window.update((r[0], r[1:]) for r in rows if r[0] in window)
                return window
        for s in range(0, len(keys), IN_KEYS):
            part = tuple(keys[s:s + IN_KEYS])
            window.update((r[0], r[1:]) for r in self._query(
                f"SELECT path, {_COLUMNS} FROM files WHERE path IN ({','.join('?' * len(part))})", part))
        return window

    def _load(self, low: bytes, high: bytes) -> None:
        self.old.update((r[0], r[1:]) for r in self._query(f"SELECT path, {_COLUMNS} FROM files WHERE path >= ? "
                                                           f"AND path < ?", (low, high)))

    def _record_of(self, key: bytes) -> tuple | None:
        row = self.old.get(key, _ASK)
        if row is not _ASK:
            return row
        rows = self._query(f"SELECT {_COLUMNS} FROM files WHERE path = ?", (key,))
        return rows[0] if rows else None

    def _connect(self) -> sqlite3.Connection | None:
        if not self.writable and not self.path.exists():
            return None
        uri = f"file:{self.path}?mode={'rwc' if self.writable else 'ro'}"
        try:
            db = sqlite3.connect(uri, uri=True, timeout=BUSY_SECONDS, check_same_thread=False)
            if self.writable:
                db.execute(_SCHEMA)
                db.execute(_TAR_SCHEMA)
                db.execute(_SEEN_SCHEMA)
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

    def unchanged(self, path: str | Path, st: os.stat_result) -> str | None:
        """The sha256 recorded for this file if it is unchanged since then."""
        key = _key(path)
        self._see(key)
        row = self._record_of(key)
        if not row or tuple(row[:4]) != _stamp(st) or not isinstance(row[4], str):
            return None
        return row[4]

    def lookup(self, path: str | Path) -> tuple[os.stat_result | None, str | None, str | None]:
        """Stat only, no read: (stat or None, the recorded sha256 if the file is unchanged, why it failed to decode
        last time if it is unchanged and did fail)."""
        st = stat(path)
        digest = self.unchanged(path, st) if st else None
        return st, digest, self.failure(path) if digest is not None else None

    def failure(self, path: str | Path) -> str | None:
        """Why this file failed last time, if it did fail with these decoders: ask only of a file unchanged() just
        found unchanged."""
        row = self._record_of(_key(path))
        return row[5] if row and row[5] and row[6] == self.decoders else None

    def record_failure(self, path: str | Path, reason: str) -> None:
        """Keep why a recorded file could not be decoded (content-deterministic: same bytes, same decoders)."""
        self._queue(self._failures, (reason, self.decoders, _key(path)))

    def record(self, path: str | Path, st: os.stat_result | Stamp, sha256: str, read_at_ns: int) -> None:
        """Remember a file hashed now; `st` was taken before reading it, and `read_at_ns` (time.time_ns()) is no
        later than the read."""
        key = _key(path)
        self._see(key)
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

    def _see(self, key: bytes) -> None:
        if self._under is not None and key not in self.old:  # (a window's keys were noted with it)
            self._queue(self._seen, (key,))

    def _note_seen(self, keys: list[tuple]) -> None:
        """Files this run stat'ed, noted at once in a temporary table (on disk past SQLite's page cache): save()
        keeps their records."""
        if not keys or self._under is None or self._db is None or not self.writable:
            return
        with self._lock:
            try:
                with self._db:
                    self._db.executemany("INSERT OR IGNORE INTO seen VALUES (?)", keys)
            except sqlite3.DatabaseError:
                self._seen_lost = True

    def _queue(self, pending: list, row: tuple) -> None:
        with self._lock:
            pending.append(row)
            full = len(self._rows) + len(self._failures) + len(self._listings) + len(self._seen) >= FLUSH_ROWS
        if full:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            seen, self._seen = self._seen, []
        self._note_seen(seen)  # apart: a failed write to files below must not lose them (save() would drop theirs)
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

    def save(self) -> None:
        """Write this run's records; drop the records under root of files this run did not find."""
        self.flush()
        if self._db is None or not self.writable:
            return
        gone = "FROM files WHERE path >= ? AND path < ? AND ctime < ? AND path NOT IN (SELECT path FROM seen)"
        args = (*self._under, self._started_ns) if self._under is not None else ()
        if args and not self._seen_lost and self._query(f"SELECT EXISTS (SELECT 1 {gone})", args) == [(1,)]:
            with self._lock:  # (asked first: an index this user may not write stays silent when nothing went)
                try:
                    with self._db:
                        self._db.execute(f"DELETE {gone}", args)
                except sqlite3.DatabaseError as e:
                    print(f"featpipe: could not update the file index {self.path} ({e})", file=sys.stderr)
        (self.path.parent / FORMAT1_NAME).unlink(missing_ok=True)


def indexed_hashes(cache_dir: Path) -> np.ndarray | None:
    """Every sha256 the index refers to (S64), or None when there is no index to trust."""
    path = Path(cache_dir) / INDEX_NAME
    if not path.exists():
        return None
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_SECONDS) as db:
            rows = db.execute("SELECT DISTINCT sha256 FROM files")
            hashes = np.fromiter((r[0].encode() for r in rows), dtype="S64")
    except sqlite3.DatabaseError:
        return None
    return hashes if len(hashes) else None


def stat(path: str | Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None
