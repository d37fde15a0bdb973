"""The embedding cache (format 2): per key, a directory of immutable HDF5 shards, and one small HDF5 file of
virtual datasets that shows them to plain h5py as a single table (the files: shards.py).

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

import os
import sys
import time
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from featpipe import format1, journal
from featpipe.errors import UserError, first_line
from featpipe.hashes import Hashes
from featpipe.rows import Rows
from featpipe.shards import (SHARD_ROWS, CacheKey, check_attrs, read_manifest, rows_of, writable_dir, write_shard,
                             write_table)


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
        self._journal_fh, self._journal_rows = None, 0
        self._lock_depth = 0  # the publish lock is re-entrant within this object (flock is not, across fds)

    def open(self, seen: list[str] | None = None) -> "Cache":
        """Find out whether this process may write; if so, convert a format-1 file and publish dead writers'
        journals. Remembers the live shards (or `seen`: those another process read the known hashes from, for a
        Ray worker): append() is for rows none of them holds; publish() drops the rows of any shard since."""
        self.writable = writable_dir(self.root)
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
            with self.locked():
                if legacy.exists():
                    format1.convert(legacy, self.key, lambda r: self._publish_rows(r, self._held(self.shards())))
                self.adopt_journals()
        self._seen = set(self.shards() if seen is None else seen)
        return self

    def close(self) -> None:
        if self._journal_fh is not None:
            self._journal_fh.close()  # releases its flock: an unpublished journal is adopted by the next writer
            self._journal_fh = None

    @property
    def journal(self) -> Path | None:
        """This writer's journal, once it has appended (a new one after each publish)."""
        return self._journal

    def __enter__(self) -> "Cache":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def shards(self) -> list[str]:
        """The manifest: live shard names, in table order."""
        return [name for name, _ in self.manifest()]

    def manifest(self) -> list[tuple[str, int]]:
        if not self.path.exists():
            return []
        try:
            return read_manifest(self.path, self.key)
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
        with self.locked() if self.writable else nullcontext():  # listed under the lock: no publish is left out
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
                self.write_table(live)
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
        cols = [self.shard_sha256(name) for name in self.shards()]
        cols += [np.array(r.sha256, "S64") for r in self.journal_records()]
        return Hashes(np.concatenate(cols) if cols else np.empty(0, "S64"))

    def shard_sha256(self, name: str) -> np.ndarray:
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
                check_attrs(f, self.key)
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
            sha = self.shard_sha256(name)
            pos = np.minimum(np.searchsorted(sha, want), max(len(sha) - 1, 0))
            hit = ~found & (sha[pos] == want) if len(sha) else np.zeros(len(want), bool)
            if hit.any():
                out[hit] = self._read_rows(name, pos[hit])
                found |= hit
        todo: dict[str, list[int]] = {}  # hashes no shard holds: in a journal, one batch at a time
        for i in np.flatnonzero(~found):
            todo.setdefault(want[i].decode(), []).append(i)
        for r in self.journal_records() if todo else ():
            for j, h in enumerate(r.sha256):
                if (at := todo.pop(h, None)) is not None:
                    out[at] = r.embeddings[j]
            if not todo:
                break
        if todo and not final:
            raise _Vanished(next(iter(todo)))
        if todo:
            raise RowsGone(f"{next(iter(todo))} is not in the cache")
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
        parts = [r for r in map(self.shard_rows, self.shards()) if r is not None]
        return Rows.concat(parts + list(self.journal_records()), self.key.dim).unique()

    def set_aside(self, name: str, why: Exception) -> None:
        """Move a broken shard out of the manifest and out of the way; its rows are recomputed when next needed."""
        self._sha[name] = np.empty(0, "S64")
        if not self.writable:
            print(f"featpipe: cache shard {self.dir / name} is unreadable ({type(why).__name__}); ignoring it",
                  file=sys.stderr)
            return
        aside = f"{name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        with self.locked():  # unlisted first: a kill between leaves a file drop_leftovers deletes, not a listed hole
            self.write_table([(n, r) for n, r in self.manifest() if n != name])
            with suppress(FileNotFoundError):
                os.replace(self.dir / name, self.dir / aside)
        print(f"featpipe: cache shard {self.key.name()}/{name} is corrupt ({type(why).__name__}: "
              f"{first_line(why)[:120]}); moved to {aside}, its rows will be recomputed", file=sys.stderr)

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

    def journal_records(self) -> Iterator[Rows]:
        """Every journal's records, one batch at a time."""
        for p in sorted(self.dir.glob(journal.PATTERN)):
            yield from journal.records(p, self.key.dim)

    def adopt_journals(self) -> None:
        """Publish the journals whose writers are gone (their flock is free), a group of about SHARD_ROWS rows at a
        time: memory holds one group however many writers died. Called under the publish lock."""
        dead, group, rows = journal.dead(self.dir), [], []
        held = [self._held(self.shards())] if dead else []  # then each group published: every shard's sorted once
        for k, (p, fd) in enumerate(dead):
            group.append((p, fd))
            rows += journal.read(p, self.key.dim)
            if sum(map(len, rows)) >= SHARD_ROWS or k + 1 == len(dead):
                new = Rows.concat(rows, self.key.dim)
                self._publish_rows(new, *held)
                held.append(Hashes(np.array(new.sha256, "S64")))
                for q, qfd in group:  # published: gone only now, so a kill before leaves them to adopt again
                    q.unlink(missing_ok=True)
                    os.close(qfd)
                group, rows = [], []

    def publish(self) -> None:
        """This writer's journal becomes a shard (if it holds rows no shard has since gained), then is deleted."""
        if self._journal_fh is None:
            return
        rows = Rows.concat(journal.read(self._journal, self.key.dim), self.key.dim)
        with self.locked():
            newer = [n for n in self.shards() if n not in self._seen]
            self._publish_rows(rows, self._held(newer))
            self._seen = set(self.shards())
            self._journal.unlink()
        self._journal_fh.close()
        self._journal_fh, self._journal_rows = None, 0

    def _publish_rows(self, rows: Rows, *held: Hashes) -> None:
        """Shards of the rows every `held` lacks, then the table listing them (under the publish lock)."""
        rows = rows.unique()
        sha = np.array(rows.sha256, "S64")
        rows = rows.take(np.flatnonzero(~np.logical_or.reduce([h.isin(sha) for h in held]))) if len(rows) else rows
        manifest = self.drop_leftovers()
        if not len(rows) and self.path.exists():
            return
        for start in range(0, len(rows), SHARD_ROWS):
            manifest.append(self.write_shard(rows.take(range(start, min(start + SHARD_ROWS, len(rows))))))
        self.write_table(manifest)

    def drop_leftovers(self) -> list[tuple[str, int]]:
        """Delete what a killed publish or compact left: shards and .tmp files not in the manifest (returned)."""
        manifest = self.manifest()
        live = {n for n, _ in manifest}
        for p in [*self.dir.glob("*.h5"), *self.dir.glob("*.tmp")]:
            if p.name not in live and not p.name.startswith(".journal-"):
                p.unlink(missing_ok=True)
        return manifest

    def write_shard(self, rows: Rows) -> tuple[str, int]:
        name, n, sha = write_shard(self.dir, self.key, rows)
        self._sha[name] = sha
        return name, n

    def write_table(self, manifest: list[tuple[str, int]]) -> None:
        write_table(self.path, self.dir, self.key, manifest)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The publish lock: held while shards or the table change (re-entrant within this object)."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        with journal.publish_lock(self.dir, f"another run publishing to {self.key.name()}"):
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0

    def shard_rows(self, name: str) -> Rows | None:
        """A shard's rows, all columns (None, and set aside, if it does not read)."""
        try:
            with h5py.File(self.dir / name, "r") as f:
                return rows_of(f)
        except OSError as e:
            self.set_aside(name, e)
            return None

    def _held(self, shards: list[str]) -> Hashes:
        return Hashes(np.concatenate([self.shard_sha256(n) for n in shards] or [np.empty(0, "S64")]))

