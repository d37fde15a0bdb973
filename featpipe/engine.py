"""The local extraction engine: files -> (read+hash+probe) -> decode -> embed -> journal, timing each stage.

Stages overlap: the reader reads each file once, on a few threads (hash and decode share the bytes; a file the
index in fileindex.py knows unchanged and cached is not read at all), and queues the images the cache lacks; a
decode thread turns batches of them into pixels; the main thread runs the model; a writer thread journals results
so disk writes never stall compute. Only images whose content hash is missing are decoded at all. The Ray
engine (ray_engine.py) replaces the decode and forward stages; `start_runtime` builds model and decoder for both.
"""

from __future__ import annotations

import hashlib
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
from featpipe.cache import Cache, CacheKey, Hashes
from featpipe.rows import Rows
from featpipe.dataset import ImageFile, read_file
from featpipe.decode import Probe, default_decode_threads, probe
from featpipe.errors import UserError

READ_AHEAD = 64  # files read and hashed ahead of the reader: bounds the bytes held while decoding lags


@dataclass(frozen=True)
class Member:
    """One image of the current data dir that has a cache row: the training sets are built from these."""

    path: str
    label: str
    sha256: str


@dataclass
class Item:
    file: ImageFile
    sha256: str
    data: bytes
    probe: Probe


class StageTimer:
    """Wall seconds per stage, summed across threads (stages overlap, so they add up to more than the total)."""

    def __init__(self) -> None:
        self._t: dict[str, float] = {}
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def add(self, stage: str, seconds: float) -> None:
        """Also for seconds measured elsewhere (Ray actors report their decode/forward time)."""
        with self._lock:
            self._t[stage] = self._t.get(stage, 0.0) + seconds

    def totals(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self._t.items()}


DONE = object()


class Engine:
    """Three threads around the model: reader (stat, read, hash, probe) -> decoder -> [main: forward] -> writer.

    The model and decoder are built when the first uncached image reaches them: a fully cached run never imports
    DALI or loads weights. Queues are bounded, so memory holds a few batches whatever the dataset size.
    """

    def __init__(self, cfg, spec, key: CacheKey, timer: StageTimer, index: fileindex.FileIndex):  # cfg: ExtractConfig
        self.cfg, self.spec, self.key, self.timer = cfg, spec, key, timer
        self.decoder_name, self.device_name, self.precision = "none", "none", "none"
        self.skipped: list[dict] = []
        self.reused_files = 0  # files served by an existing row: identical files count once each
        self.first_copy: set[str] = set()  # hashes this run computes
        self.copies: list[tuple[ImageFile, str]] = []  # later files with those bytes: settled like the first
        self.failed: dict[str, str] = {}  # hash -> why its first copy did not decode
        self.errors: list[BaseException] = []
        self.members: list[Member] = []
        self.batch_size = cfg.batch_size or 32  # raised to the device's default once the runtime starts
        self.model_waiting = threading.Event()
        self.index = index

    def run(self, files: list[ImageFile], known: Hashes, cache: Cache, progress):
        """Journal a row for every image `known` lacks; returns (hashes computed, skipped)."""
        encoded: queue.Queue = queue.Queue(maxsize=4)
        decoded: queue.Queue = queue.Queue(maxsize=3)
        written: queue.Queue = queue.Queue(maxsize=8)
        out: set[str] = set()
        stages = [(self._read, (files, known, encoded)), (self._decode, (encoded, decoded)),
                  (self._write, (written, cache, out))]
        threads = [threading.Thread(target=self._guard, args=(fn, args), daemon=True) for fn, args in stages]
        for t in threads:
            t.start()
        done = 0
        try:
            while (msg := self._next(decoded)) is not DONE:
                if isinstance(msg, int):  # files the reader settled without compute (cached or skipped)
                    done += msg
                else:
                    done += self._forward(*msg, written)
                if progress:
                    progress(done, len(files))
                if self.errors:
                    break
        finally:
            written.put(DONE)
            threads[2].join()
        if self.errors:
            raise self.errors[0]
        self._settle_copies()
        self.skipped.sort(key=lambda s: s["path"])
        return out, self.skipped

    def _settle_copies(self) -> None:
        """A file whose bytes another file of this run carried is reused if that copy decoded, else skipped."""
        for f, digest in self.copies:
            if digest in self.failed:
                self.skipped.append({"path": str(f.path), "reason": self.failed[digest]})
                self.index.record_failure(f.path, self.failed[digest])
            else:
                self.reused_files += 1

    def _next(self, decoded: queue.Queue):
        """The next decoded batch; `model_waiting` is set for as long as the model has to wait for it."""
        try:
            return decoded.get_nowait()
        except queue.Empty:
            self.model_waiting.set()
            try:
                return decoded.get()
            finally:
                self.model_waiting.clear()

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

    def _read(self, files: list[ImageFile], known: Hashes, encoded: queue.Queue) -> None:
        batch: list[Item] = []
        settled = 0
        for f, data, digest, err in self._hashed(files, known):
            if digest is not None:
                self.members.append(Member(str(f.path), f.label, digest))
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
                self.skipped.append({"path": str(f.path), "reason": err})
                settled += 1
                continue
            known.add(digest)  # identical bytes twice in one run: embed once
            self.first_copy.add(digest)
            batch.append(Item(f, digest, data, p))
            if len(batch) >= self.batch_size:
                encoded.put((batch, settled))
                batch, settled = [], 0
        encoded.put((batch, settled))
        encoded.put(DONE)

    def _hashed(self, files: list[ImageFile], known: Hashes) -> Iterator[tuple[ImageFile, bytes | None, str | None,
                                                                                   str | None]]:
        """(file, bytes, sha256, unreadable reason) in scan order, read and hashed on a few threads (hashlib
        releases the GIL). A file the index knows unchanged, with a cache row, is not read at all (bytes None).
        At most READ_AHEAD files are held at a time."""
        with ThreadPoolExecutor(max_workers=default_decode_threads()) as pool:
            window: deque = deque(pool.submit(self._read_hash, f, known) for f in files[:READ_AHEAD])
            for f in files[READ_AHEAD:]:
                yield window.popleft().result()
                window.append(pool.submit(self._read_hash, f, known))
            while window:
                yield window.popleft().result()

    def _read_hash(self, f: ImageFile, known: Hashes) -> tuple[ImageFile, bytes | None, str | None, str | None]:
        with self.timer("stat"):
            st = fileindex.stat(f.path)
            digest = self.index.unchanged(f.path, st) if st else None
        if digest in known:
            return f, None, digest, None
        if digest is not None and (reason := self.index.failure(f.path)):
            return f, None, None, reason  # failed to decode last time, and unchanged: not read again
        read_at_ns = time.time_ns()
        with self.timer("read"):
            data, err = read_file(f, st)
        if data is None:
            return f, None, None, err
        with self.timer("hash"):
            digest = hashlib.sha256(data).hexdigest()
        if st:
            self.index.record(f.path, st, digest, read_at_ns)
        return f, data, digest, None

    def _decode(self, encoded: queue.Queue, decoded: queue.Queue) -> None:
        decoder = None
        while (msg := encoded.get()) is not DONE:
            batch, settled = msg
            if settled:
                decoded.put(settled)
            if not batch:
                continue
            if decoder is None:
                decoder = self._start_runtime()
            with self.timer("decode"):
                pixels, reasons = decoder.decode([it.data for it in batch], [it.probe for it in batch])
            decoded.put((batch, pixels, reasons))
        decoded.put(DONE)

    def _start_runtime(self):
        """Device, precision, model and decoder, built once, on the first batch that needs them."""
        self.embedder, decoder = start_runtime(self.cfg, self.spec, self.timer, self.model_waiting)
        self.decoder_name, self.device_name = decoder.name, str(self.embedder.device)
        self.precision = self.embedder.precision
        self.batch_size = batch_size_for(self.cfg, self.embedder.device)
        return decoder

    def _forward(self, batch: list[Item], pixels, reasons: list[str | None], written: queue.Queue) -> int:
        return self._emit(batch, embed_decoded(self.embedder, pixels, reasons, self.timer, wait=False), reasons,
                          written)

    def _emit(self, batch: list[Item], emb: np.ndarray | None, reasons: list[str | None],
              written: queue.Queue) -> int:
        """Record skip reasons and queue the decoded images' rows for the writer (shared with the Ray engine)."""
        ok = [it for it, r in zip(batch, reasons) if r is None]
        for it, r in zip(batch, reasons):
            if r:
                self.skipped.append({"path": str(it.file.path), "reason": r})
                self.failed[it.sha256] = r
                self.index.record_failure(it.file.path, r)
        if ok:
            written.put(Rows([it.sha256 for it in ok], emb, [str(it.file.path) for it in ok],
                             [it.file.label for it in ok]))
        return len(batch)

    def _write(self, written: queue.Queue, cache: Cache, out: set[str]) -> None:
        while (rows := written.get()) is not DONE:
            rows.embeddings = np.asarray(rows.embeddings)  # waits for an async GPU copy: here, not in compute
            with self.timer("write"), user_error_if_disk_fails(cache.dir):
                cache.append(rows)
            out.update(rows.sha256)


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


def start_runtime(cfg, spec, timer: StageTimer, model_waiting: threading.Event | None = None):
    """(Embedder, decoder) for cfg: one recipe for the local engine and every Ray actor.

    `model_waiting`, set while the model waits for decoded batches: with the model on the CPU, the decoder then
    works in the background and hurries only when the model waits (decode.PilDecoder)."""
    from featpipe.backbone import load
    from featpipe.decode import make_decoder
    from featpipe.embed import Embedder, configure_cpu, resolve_device, resolve_precision

    configure_cpu()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    with timer("load_model"):
        embedder = Embedder(load(spec, cfg.weights).model, device, precision)
    cuda = (device.index or 0) if device.type == "cuda" else None
    decoder = make_decoder(cfg.decoder, spec.preprocessing, batch_size_for(cfg, device), cuda,
                           model_waiting if cuda is None else None)
    return embedder, decoder


def batch_size_for(cfg, device) -> int:
    from featpipe.embed import default_batch_size

    return cfg.batch_size or default_batch_size(device)


def embed_decoded(embedder, pixels, reasons: list[str | None], timer: StageTimer, wait: bool = True):
    """Embeddings of a decoded batch; None when every image failed to decode (the model never sees an empty batch).

    wait=False may return a handle that np.asarray() resolves (CUDA: the GPU keeps computing meanwhile)."""
    if None not in reasons:
        return None
    with timer("forward"):
        return embedder(pixels) if wait else embedder.submit(pixels)
