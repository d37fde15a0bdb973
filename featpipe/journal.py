"""A writer's journal: append-only, one CRC-checked record per batch, flushed per batch, locked by its writer.

The writer holds an flock on its journal for as long as it lives; the kernel drops it with the process, so a
journal whose lock can be taken belongs to a dead writer and may be published by anyone (cache.py does)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import uuid
import zlib
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from featpipe.rows import Rows

MAGIC = b"FPJ1"
HEADER = struct.Struct("<4sII")  # magic, payload length, crc32(payload)
PATTERN = "journal-*.fpj"


def encode(rows: Rows) -> bytes:
    meta = json.dumps({"sha256": rows.sha256, "path": rows.paths, "label": rows.labels}).encode()
    payload = struct.pack("<I", len(meta)) + meta + np.ascontiguousarray(rows.embeddings, np.float32).tobytes()
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def read(path: Path, dim: int) -> list[Rows]:
    """A journal's whole records."""
    return list(records(path, dim))


def records(path: Path, dim: int) -> Iterator[Rows]:
    """A journal's whole records, one at a time: memory holds one batch, not the journal. Parsing stops at the
    first record that is torn (a kill mid-write, a full disk) or does not parse: everything before it is whole."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        size = os.fstat(f.fileno()).st_size
        while len(head := f.read(HEADER.size)) == HEADER.size:
            magic, n, crc = HEADER.unpack(head)
            payload = f.read(n) if magic == MAGIC and n <= size - f.tell() else b""  # a garbage n allocates nothing
            if magic != MAGIC or len(payload) != n or zlib.crc32(payload) != crc:
                return
            try:
                rows = _parse(payload, dim)
            except (ValueError, KeyError, TypeError, struct.error):
                return
            yield rows


def _parse(payload: bytes, dim: int) -> Rows:
    (mlen,) = struct.unpack_from("<I", payload)
    meta = json.loads(payload[4:4 + mlen])
    emb = np.frombuffer(payload[4 + mlen:], np.float32).reshape(-1, dim)
    if not len(meta["sha256"]) == len(meta["path"]) == len(meta["label"]) == len(emb):
        raise ValueError("record columns differ in length")
    return Rows(meta["sha256"], emb, meta["path"], meta["label"])


def create(folder: Path):
    """(path, open file) of a new journal: no other writer ever takes a live journal for a dead one's."""
    final = folder / f"journal-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.fpj"
    return final, locked_new(final)


def locked_new(final: Path):
    """A new file opened for appending and flocked before it gets its name: whoever finds its lock free (try_lock)
    knows its owner is gone."""
    tmp = final.with_name(f".{final.name}.tmp")
    while True:
        fh = open(tmp, "ab")
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        if os.fstat(fh.fileno()).st_nlink:  # else dead() locked it first, took it for a killed writer's, deleted it
            break
        fh.close()
    os.replace(tmp, final)
    return fh


def dead(folder: Path) -> list[tuple[Path, int]]:
    """The journals whose writers are gone, each with an fd holding its lock (close it after deleting the file).
    Leftover unnamed ones (a writer killed between creating and naming its journal) are deleted."""
    for p in folder.glob(".journal-*.tmp"):
        fd = try_lock(p)
        if fd is not None:
            p.unlink(missing_ok=True)
            os.close(fd)
    found = [(p, try_lock(p)) for p in sorted(folder.glob(PATTERN))]
    return [(p, fd) for p, fd in found if fd is not None]


def try_lock(path: Path) -> int | None:
    """An fd holding path's flock, or None when a live writer holds it (or it is gone)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


@contextmanager
def publish_lock(folder: Path, holder: str) -> Iterator[None]:
    """flock on <folder>/publish.lock: one publisher at a time; says so on stderr when it has to wait for `holder`."""
    fd = os.open(folder / "publish.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"featpipe: waiting for {holder} …", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
