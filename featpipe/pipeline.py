"""What extraction's stages pass each other: typed queue messages, the `Compute` protocol that the local compute
stage implements, the per-stage timer every stage (and the Ray workers) reports to, and the readers' hash step."""

from __future__ import annotations

import hashlib
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

from featpipe.dataset import ImageFile
from featpipe.decode import Probe

DONE = object()  # the last message on every queue


@dataclass
class Item:
    """One image the cache lacks: its bytes, read once, and their probe."""

    file: ImageFile
    sha256: str
    data: bytes
    probe: Probe


@dataclass
class Encoded:
    """Reader -> compute: images to embed, and how many files the reader settled before them without compute
    (cached or skipped), so progress counts every file in order."""

    items: list[Item]
    settled: int


@dataclass
class Computed:
    """Compute -> writer: `embeddings` has one row per item whose reason is None; it is an array, a pending GPU copy
    that np.asarray() resolves, or None when no item decoded."""

    items: list[Item]
    embeddings: Any
    reasons: list[str | None]
    settled: int


class Compute(Protocol):
    """Decode + forward (compute.LocalCompute): takes `Encoded` messages from `encoded` until DONE and yields one
    `Computed` per message, in any order. The model is built on the first message that has items, so a fully cached
    run loads nothing."""

    batch_size: int  # images per Encoded message the reader should send (read again before each one)

    def described(self) -> tuple[str, str, str]:
        """(decoder, device, precision) as the result reports them; "none" until the runtime started."""

    def run(self, encoded) -> Iterator[Computed]:
        """`encoded`: a queue.Queue of Encoded messages ending in DONE."""


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


def hashed(data: bytes | None, reason: str | None, timer: StageTimer) -> tuple[bytes | None, str | None, str | None]:
    """(bytes, sha256, None) of bytes read, or (None, None, why there are none): every reader's hash step."""
    if data is None:
        return None, None, reason
    with timer("hash"):
        return data, hashlib.sha256(data).hexdigest(), None
