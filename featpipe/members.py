"""The images of a run that have a cache row (extract's result; training sets and exports are built from them),
held column-wise: the scan's own ImageFile objects and 32 raw digest bytes each, not an object and a hex string
per image besides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from featpipe.dataset import ImageFile

DIGEST = 32  # bytes of a sha256


@dataclass(frozen=True, slots=True)
class Member:
    """One image as readers see it, made when asked for (iteration, slices)."""

    path: str
    label: str
    sha256: str


class Members:
    def __init__(self, files: list[ImageFile] | None = None, digests: bytearray | None = None):
        self.files: list[ImageFile] = [] if files is None else files  # path, label: shared with the scan's list
        self._digests = bytearray() if digests is None else digests

    def append(self, f: ImageFile, sha256: str) -> None:
        self.files.append(f)
        self._digests += bytes.fromhex(sha256)

    def sha256(self, i: int) -> str:
        return self._digests[i * DIGEST:(i + 1) * DIGEST].hex()

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Member]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, at: int | slice) -> Member | list[Member]:
        if isinstance(at, slice):
            return [self[i] for i in range(len(self))[at]]
        f = self.files[at]
        return Member(f.path, f.label, self.sha256(at % len(self)))

    def take(self, rows: Iterable[int] | np.ndarray) -> Members:
        rows = np.fromiter(rows, np.int64) if not isinstance(rows, np.ndarray) else rows  # 8 bytes a row, not 36
        digests = np.frombuffer(self._digests, np.uint8).reshape(-1, DIGEST)[rows]
        return Members([self.files[i] for i in rows], bytearray(digests.tobytes()))

    def where(self, keep: Callable[[str], bool]) -> Members:
        """The members whose sha256 passes `keep` (these same ones when all do: no copy)."""
        kept = np.fromiter((keep(self.sha256(i)) for i in range(len(self))), bool, len(self))
        return self if kept.all() else self.take(np.flatnonzero(kept))

    def by_path(self) -> Members:
        """Sorted by path: an order that does not depend on how the files were listed or on hash order."""
        paths = np.fromiter((f.path for f in self.files), object, len(self))  # pointers, not a copy of each path
        return self.take(np.argsort(paths, kind="stable"))
