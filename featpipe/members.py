"""The images of a run that have a cache row (extract's result; training sets and exports are built from them),
held column-wise: the scan's own ImageFile objects and 32 raw digest bytes each, not an object and a hex string
per image besides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

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
        return (Member(f.path, f.label, self.sha256(i)) for i, f in enumerate(self.files))

    def __getitem__(self, part: slice) -> list[Member]:
        return [Member(self.files[i].path, self.files[i].label, self.sha256(i)) for i in range(len(self))[part]]

    def take(self, rows: Iterable[int]) -> Members:
        out = Members()
        for i in rows:
            out.files.append(self.files[i])
            out._digests += self._digests[i * DIGEST:(i + 1) * DIGEST]
        return out

    def where(self, keep: Callable[[str], bool]) -> Members:
        """The members whose sha256 passes `keep` (these same ones when all do: no copy)."""
        rows = [i for i in range(len(self)) if keep(self.sha256(i))]
        return self if len(rows) == len(self) else self.take(rows)

    def by_path(self) -> Members:
        """Sorted by path: an order that does not depend on how the files were listed or on hash order."""
        return self.take(sorted(range(len(self)), key=lambda i: self.files[i].path))
