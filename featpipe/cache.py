"""The embedding cache: one HDF5 file per (backbone, weights sha256, preprocessing), rows keyed by content hash.

Crash safety without trusting HDF5 to survive a SIGKILL mid-write:
- new rows go to an append-only journal beside the .h5 (`<name>.journal`), one CRC-checked record per batch,
  flushed per batch: a kill loses at most the batch in flight, and a torn last record is ignored (and cut off
  before the next run appends);
- the .h5 is only ever replaced whole (write `<name>.h5.tmp`, fsync, rename), merging the journal in; so the .h5 on
  disk is always a complete file, and the journal is deleted only after the rename;
- a file lock (`<name>.lock`) makes one writer at a time; readers need no lock (they see an old or a new file).
embeddings and sha256 carry fletcher32 checksums, so garbage written into them is an error on read, never wrong
floats.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from featpipe import __version__
from featpipe.errors import UserError, first_line
from featpipe.preprocess import Preprocessing

FORMAT_VERSION = 1
_MAGIC = b"FPJ1"
_HEADER = struct.Struct("<4sII")  # magic, payload length, crc32(payload)


@dataclass(frozen=True)
class CacheKey:
    backbone: str
    weights_sha256: str
    preprocessing: Preprocessing
    dim: int

    def filename(self) -> str:
        return f"{self.backbone}-{self.weights_sha256[:12]}-{self.preprocessing.digest()[:8]}.h5"

    def attrs(self) -> dict:
        return {"backbone": self.backbone, "weights_sha256": self.weights_sha256,
                "preprocessing": self.preprocessing.to_json(), "dim": self.dim}


@dataclass
class Rows:
    """Column-wise rows: sha256 hex, embedding, path (as last seen), label (class folder as last seen)."""

    sha256: list[str]
    embeddings: np.ndarray
    paths: list[str]
    labels: list[str]

    @classmethod
    def empty(cls, dim: int) -> "Rows":
        return cls([], np.empty((0, dim), np.float32), [], [])

    def __len__(self) -> int:
        return len(self.sha256)


class Cache:
    def __init__(self, cache_dir: Path, key: CacheKey):
        self.dir, self.key = Path(cache_dir), key
        self.path = self.dir / key.filename()
        self.journal = self.path.with_suffix(".journal")
        self.lockfile = self.path.with_suffix(".lock")
        self._lock_fd: int | None = None
        self._journal_fh = None
        self.writable = True  # lock() finds out

    # ---- locking -------------------------------------------------------------------------------------------
    def lock(self, wait: bool = True) -> "Cache":
        """Exclusive writer lock. Waits (saying so once on stderr) unless wait=False, then raises UserError.

        A cache dir this process cannot write (a shared team cache) is opened read-only instead: readers need no
        lock, and append() refuses only when a run has something new to write."""
        self.writable = _writable_dir(self.dir)
        if not self.writable:
            return self
        try:
            fd = os.open(self.lockfile, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:  # a shared dir whose lock file another user owns: read it, as a reader
            self.writable = False
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                raise UserError(f"another featpipe run is writing {self.path}; try again when it finishes") from None
            print(f"featpipe: waiting for another run writing {self.path.name} …", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        self._lock_fd = fd
        return self

    def unlock(self) -> None:
        if self._journal_fh is not None:
            self._journal_fh.close()
            self._journal_fh = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def __enter__(self) -> "Cache":
        return self.lock()

    def __exit__(self, *exc) -> None:
        self.unlock()

    # ---- reading -------------------------------------------------------------------------------------------
    def read(self) -> Rows:
        """All committed rows (the .h5, plus journal records left by a killed run). Corrupt .h5 -> moved aside.

        Reads every embedding, so fletcher32 checks the whole file each time it is opened.
        """
        rows = self._read_h5()
        return merge(rows, self._read_journal()) if self.journal.exists() else rows

    def _read_h5(self) -> Rows:
        if not self.path.exists():
            return Rows.empty(self.key.dim)
        try:
            with h5py.File(self.path, "r") as f:
                self._check_attrs(f)
                sha = [s.decode() for s in f["sha256"][:]]
                emb = f["embeddings"][:]
                paths, labels = _os_strings(f["path"][:]), _os_strings(f["label"][:])
                if not (len(sha) == len(paths) == len(labels) == len(emb)) or emb.shape[1:] != (self.key.dim,):
                    raise ValueError("column lengths differ")
            return Rows(sha, emb.astype(np.float32, copy=False), paths, labels)
        except (BlockingIOError, PermissionError) as e:  # a healthy file we may not open now: never set it aside
            raise UserError(f"cannot open cache {self.path}: {e.strerror or e} (is another program holding it "
                            f"open for writing?)") from None
        except (OSError, KeyError, ValueError) as e:
            self._quarantine(e)
            return Rows.empty(self.key.dim)

    def _check_attrs(self, f: h5py.File) -> None:
        want = self.key.attrs()
        for k, v in want.items():
            got = f.attrs.get(k)
            got = got.decode() if isinstance(got, bytes) else got
            if got != v:
                raise ValueError(f"attribute {k} is {got!r}, expected {v!r}")

    def _quarantine(self, why: Exception) -> None:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            os.replace(self.path, aside)
        except OSError:
            return
        print(f"featpipe: cache {self.path.name} is corrupt ({type(why).__name__}: {first_line(why)[:120]}); "
              f"moved to {aside.name}, rebuilding", file=sys.stderr)

    # ---- journal -------------------------------------------------------------------------------------------
    def append(self, rows: Rows) -> None:
        """Journal one batch; flushed before returning so a SIGKILL after this call keeps it."""
        if not self.writable:
            raise UserError(f"cache dir {self.dir} is not writable and this run has new images to embed; "
                            f"pass --cache-dir to a writable folder")
        assert self._lock_fd is not None, "append() needs the writer lock"
        if self._journal_fh is None:
            self._journal_fh = open(self.journal, "ab")
            self._journal_fh.truncate(self._journal_records()[1])  # else records after a torn one go unread
        meta = json.dumps({"sha256": rows.sha256, "path": rows.paths, "label": rows.labels}).encode()
        payload = struct.pack("<I", len(meta)) + meta + np.ascontiguousarray(rows.embeddings, np.float32).tobytes()
        self._journal_fh.write(_HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload)
        self._journal_fh.flush()

    def _read_journal(self) -> Rows:
        rows = Rows.empty(self.key.dim)
        for part in self._journal_records()[0]:
            rows = merge(rows, part)
        return rows

    def _journal_records(self) -> tuple[list[Rows], int]:
        """The journal's whole records, and the byte length they fill. Parsing stops at the first record that
        is torn (a kill mid-write, a full disk) or does not parse: everything before it is whole."""
        try:
            data = self.journal.read_bytes()
        except FileNotFoundError:
            return [], 0
        pos, parts = 0, []
        while pos + _HEADER.size <= len(data):
            magic, n, crc = _HEADER.unpack_from(data, pos)
            payload = data[pos + _HEADER.size: pos + _HEADER.size + n]
            if magic != _MAGIC or len(payload) != n or zlib.crc32(payload) != crc:
                break
            try:
                parts.append(self._parse_record(payload))
            except (ValueError, KeyError, TypeError, struct.error):
                break
            pos += _HEADER.size + n
        return parts, pos

    def _parse_record(self, payload: bytes) -> Rows:
        (mlen,) = struct.unpack_from("<I", payload)
        meta = json.loads(payload[4:4 + mlen])
        emb = np.frombuffer(payload[4 + mlen:], np.float32).reshape(-1, self.key.dim)
        if not len(meta["sha256"]) == len(meta["path"]) == len(meta["label"]) == len(emb):
            raise ValueError("record columns differ in length")
        return Rows(meta["sha256"], emb, meta["path"], meta["label"])

    # ---- compaction ----------------------------------------------------------------------------------------
    def commit(self, rows: Rows) -> None:
        """Atomically replace the .h5 with `rows`, then drop the journal (whose rows `rows` must include)."""
        assert self._lock_fd is not None, "commit() needs the writer lock"
        self._check_space(rows)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with h5py.File(tmp, "w") as f:
            for k, v in {**self.key.attrs(), "featpipe_version": __version__, "format_version": FORMAT_VERSION,
                         "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}.items():
                f.attrs[k] = v
            n, dim = len(rows), self.key.dim
            chunks = (max(1, min(n, max(1, 65536 // dim))), dim) if n else None
            f.create_dataset("embeddings", data=rows.embeddings.reshape(n, dim), maxshape=(None, dim),
                             chunks=chunks or (1, dim), fletcher32=True)
            f.create_dataset("sha256", data=np.array(rows.sha256, dtype="S64"), maxshape=(None,),
                             chunks=True, fletcher32=True)
            strings = h5py.string_dtype("utf-8")
            f.create_dataset("path", data=_os_bytes(rows.paths), dtype=strings, maxshape=(None,),
                             chunks=True)
            f.create_dataset("label", data=_os_bytes(rows.labels), dtype=strings, maxshape=(None,),
                             chunks=True)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        if self._journal_fh is not None:
            self._journal_fh.close()
            self._journal_fh = None
        self.journal.unlink(missing_ok=True)

    def _check_space(self, rows: Rows) -> None:
        """HDF5 running out of disk mid-write can take the process down with it (a segfault in h5py's cleanup,
        seen here): refuse before writing. The journal still holds the run's rows for the next try."""
        need = rows.embeddings.nbytes + sum(64 + len(p) + len(lbl) for p, lbl in zip(rows.paths, rows.labels))
        free = shutil.disk_usage(self.dir).free
        if free < need + (1 << 20):
            raise OSError(errno.ENOSPC, f"no space left for the cache: about {need / 2**20:.1f} MiB needed, "
                                        f"{free / 2**20:.1f} MiB free")


def merge(a: Rows, b: Rows) -> Rows:
    """Rows of a, then rows of b whose hash a lacks (first writer wins; b's path/label refresh a's)."""
    index = {h: i for i, h in enumerate(a.sha256)}
    paths, labels = list(a.paths), list(a.labels)
    new = []
    for j, h in enumerate(b.sha256):
        if h in index:
            paths[index[h]], labels[index[h]] = b.paths[j], b.labels[j]
        else:
            index[h] = len(a.sha256) + len(new)
            new.append(j)
    emb = np.concatenate([a.embeddings, b.embeddings[new]])
    return Rows(a.sha256 + [b.sha256[j] for j in new], emb, paths + [b.paths[j] for j in new],
                labels + [b.labels[j] for j in new])


def _os_bytes(names: list[str]) -> np.ndarray:
    """File names are bytes on Linux and may not be UTF-8 (Python holds those as surrogates, which UTF-8 cannot
    encode): store the original bytes, which are plain UTF-8 for every name that is valid UTF-8."""
    return np.array([n.encode("utf-8", "surrogateescape") for n in names], dtype=object)


def _os_strings(values) -> list[str]:
    """Inverse of _os_bytes: the same str the scan produced, so an unchanged non-UTF-8 name is not 'moved'."""
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
