"""Extraction's driver: files -> reader (stat, read, hash, probe) -> compute (decode + forward) -> writer (journal).

Stages overlap: the reader reads each file once, on a few threads (hash and decode share the bytes; a file the
index in fileindex.py knows unchanged and cached is not read at all), and queues the images the cache lacks; the
compute stage (pipeline.Compute: compute.LocalCompute) turns them into embeddings; a writer thread journals rows so
disk writes never stall compute. Only images whose content hash is missing are decoded at all. Queues are bounded,
so memory holds a few batches whatever the dataset size. WebDataset shards come through the same stages:
tar_reader.py reads their samples instead of files. `--engine ray` runs ray_data.py instead of this class.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from featpipe import fileindex
from featpipe.cache import Cache
from featpipe.hashes import Hashes
from featpipe.members import Members
from featpipe.dataset import ImageFile, read_file
from featpipe.decode import default_decode_threads, probe
from featpipe.errors import UserError
from featpipe.pipeline import DONE, Compute, Computed, Encoded, Item, StageTimer, hashed
from featpipe.rows import Rows
from featpipe.tar_reader import read_shards

READ_AHEAD = 64  # files read and hashed ahead of the reader: bounds the bytes held while decoding lags


@dataclass(frozen=True)
class Shards:
    """WebDataset .tar shards (tar_input.expand) as the engine's input instead of a list of files."""

    paths: list[Path]


class Engine:
    """Reader and writer threads around a compute stage that the calling thread drives (see the module doc)."""

    def __init__(self, compute: Compute, timer: StageTimer, index: fileindex.FileIndex):
        self.compute, self.timer, self.index = compute, timer, index
        self.skipped: list[dict] = []
        self.reused_files = 0  # files served by an existing row: identical files count once each
        self.first_copy: set[str] = set()  # hashes this run computes
        self.copies: list[tuple[ImageFile, str]] = []  # later files with those bytes: settled like the first
        self.failed: dict[str, str] = {}  # hash -> why its first copy did not decode
        self.errors: list[BaseException] = []
        self.members = Members()  # the images read that have (or will have) a row
        self.inputs = 0  # files (or shard samples, and a shard's damaged tail) the reader went through

    def described(self) -> tuple[str, str, str]:
        return self.compute.described()

    def run(self, files: list[ImageFile] | Shards, known: Hashes, cache: Cache, progress):
        """Journal a row for every image `known` lacks; returns (hashes computed, skipped). `files` may be
        WebDataset shards, whose number of samples is known only once they are read (progress has no total)."""
        encoded: queue.Queue = queue.Queue(maxsize=4)
        written: queue.Queue = queue.Queue(maxsize=8)
        out: set[str] = set()
        reader = threading.Thread(target=self._guard, args=(self._read, (files, known, encoded)), daemon=True)
        writer = threading.Thread(target=self._guard, args=(self._write, (written, cache, out)), daemon=True)
        reader.start()
        writer.start()
        done = 0
        results = self.compute.run(encoded)
        try:
            for msg in results:
                done += msg.settled + self._emit(msg, written)
                if progress:
                    progress(done, len(files) if isinstance(files, list) else None)
                if self.errors:
                    break
        finally:
            results.close()  # a compute stage's own clean-up (a local Ray shuts down) runs now, also on errors
            written.put(DONE)
            writer.join()
        if self.errors:
            raise self.errors[0]
        self._settle_copies()
        self.skipped.sort(key=lambda s: s["path"])
        return out, self.skipped

    def _settle_copies(self) -> None:
        """A file whose bytes another file of this run carried is reused if that copy decoded, else skipped."""
        for f, digest in self.copies:
            if digest in self.failed:
                self.skipped.append({"path": f.path, "reason": self.failed[digest]})
                self.index.record_failure(f.path, self.failed[digest])
            else:
                self.reused_files += 1

    def _guard(self, fn, args) -> None:
        try:
            fn(*args)
        except BaseException as e:  # surfaced in the main thread
            self.errors.append(e)
            if fn == self._write:  # (bound methods are equal, never identical)
                while args[0].get() is not DONE:  # the main thread may be blocked putting a batch: let it finish
                    pass
            else:
                args[-1].put(DONE)

    def _read(self, files: list[ImageFile] | Shards, known: Hashes, encoded: queue.Queue) -> None:
        batch: list[Item] = []
        settled = 0
        inputs = self._hashed(files, known) if isinstance(files, list) else \
            read_shards(files.paths, known, self.index, self.timer)
        for f, data, digest, err in inputs:
            self.inputs += 1
            if digest is not None:
                self.members.append(f, digest)
                if digest in known:
                    if digest in self.first_copy:
                        self.copies.append((f, digest))
                    else:
                        self.reused_files += 1
                    settled += 1
                    continue
                with self.timer("probe"):
                    p = probe(data)
                err = p.skip_reason
                if err:
                    self.index.record_failure(f.path, err)
            if err:
                self.skipped.append({"path": f.path, "reason": err})
                settled += 1
                continue
            known.add(digest)  # identical bytes twice in one run: embed once
            self.first_copy.add(digest)
            batch.append(Item(f, digest, data, p))
            if len(batch) >= self.compute.batch_size:
                encoded.put(Encoded(batch, settled))
                batch, settled = [], 0
        encoded.put(Encoded(batch, settled))
        encoded.put(DONE)

    def _hashed(self, files: list[ImageFile], known: Hashes) -> Iterator[tuple[ImageFile, bytes | None, str | None,
                                                                                   str | None]]:
        """(file, bytes, sha256, unreadable reason) in scan order, read and hashed on a few threads (hashlib
        releases the GIL). A file the index knows unchanged, with a cache row, is not read at all (bytes None).
        At most READ_AHEAD files are held at a time."""
        with ThreadPoolExecutor(max_workers=default_decode_threads()) as pool:
            window: deque = deque()
            for f in self.index.prefetching(files, lambda f: f.path):
                if len(window) == READ_AHEAD:
                    yield window.popleft().result()
                window.append(pool.submit(self._read_hash, f, known))
            while window:
                yield window.popleft().result()

    def _read_hash(self, f: ImageFile, known: Hashes) -> tuple[ImageFile, bytes | None, str | None, str | None]:
        with self.timer("stat"):
            st, digest, failed = self.index.lookup(f.path)
        if digest in known:
            return f, None, digest, None
        if failed:
            return f, None, None, failed  # failed to decode last time, and unchanged: not read again
        read_at_ns = time.time_ns()
        data, digest, err = read_hashed(f, st, self.timer)
        if data is None:
            return f, None, None, err
        if st:
            self.index.record(f.path, st, digest, read_at_ns)
        return f, data, digest, None

    def _emit(self, msg: Computed, written: queue.Queue) -> int:
        """Record skip reasons and queue the decoded images' rows for the writer; returns the files settled."""
        ok = [it for it, r in zip(msg.items, msg.reasons) if r is None]
        for it, r in zip(msg.items, msg.reasons):
            if r:
                self.skipped.append({"path": it.file.path, "reason": r})
                self.failed[it.sha256] = r
                self.index.record_failure(it.file.path, r)
        if ok:
            written.put(Rows([it.sha256 for it in ok], msg.embeddings, [it.file.path for it in ok],
                             [it.file.label for it in ok]))
        return len(msg.items)

    def _write(self, written: queue.Queue, cache: Cache, out: set[str]) -> None:
        while (rows := written.get()) is not DONE:
            rows.embeddings = np.asarray(rows.embeddings)  # waits for an async GPU copy: here, not in compute
            with self.timer("write"), user_error_if_disk_fails(cache.dir):
                cache.append(rows)
            out.update(rows.sha256)


def read_hashed(f: ImageFile, st, timer: StageTimer) -> tuple[bytes | None, str | None, str | None]:
    """(bytes, sha256, None) of a file read once, or (None, None, why it cannot be read); `st`: its stat, if taken."""
    with timer("read"):
        data, err = read_file(f, st)
    return hashed(data, err, timer)


@contextmanager
def user_error_if_disk_fails(path: Path) -> Iterator[None]:
    """A full disk or a failing one: one line naming the file (the journal keeps every batch written before)."""
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def decoders_version(decoder: str) -> str:
    """What a recorded decode failure depends on (fileindex): featpipe's probe and fallbacks, Pillow (every reason
    comes from it), and the --decoder asked for (a batched decoder may take a file Pillow fails on)."""
    import PIL

    from featpipe import __version__

    return f"featpipe {__version__}, Pillow {PIL.__version__}, --decoder {decoder}"
