"""Which sha256 a cache holds, as one sorted array of raw digests: lookups for 10^7 rows without a Python object
per row."""

from __future__ import annotations

import binascii

import numpy as np


class Hashes:
    """Which sha256 a cache holds: one sorted array of raw 32-byte digests (no Python object per row)."""

    def __init__(self, hex_digests: np.ndarray):
        v = np.sort(_raw(hex_digests))  # np.unique sorts bytes several times slower
        self.sorted = v[np.concatenate([[True], v[1:] != v[:-1]])] if len(v) else v
        self.added: set[str] = set()  # hashes a run queued after opening (identical files embed once)

    @classmethod
    def from_sorted(cls, raw: np.ndarray) -> "Hashes":
        """Another Hashes' `sorted` array (shipped to a Ray actor, say), taken as it is: no sorting again."""
        h = cls(np.empty(0, "S64"))
        h.sorted = raw
        return h

    def __contains__(self, digest) -> bool:
        if digest is None:
            return False
        if digest in self.added:
            return True
        b = bytes.fromhex(digest)  # one scalar per file: cheaper than isin's arrays
        i = int(np.searchsorted(self.sorted, b))
        return i < len(self.sorted) and self.sorted[i] == b.rstrip(b"\0")  # numpy hands values out NUL-stripped

    def add(self, digest: str) -> None:
        self.added.add(digest)

    def isin(self, hex_digests: np.ndarray) -> np.ndarray:
        raw = _raw(hex_digests)
        if not len(self.sorted):
            return np.zeros(len(raw), bool)
        i = np.minimum(np.searchsorted(self.sorted, raw), len(self.sorted) - 1)
        return self.sorted[i] == raw  # (S32 compares whole arrays bytewise: digests ending in 0x00 included)

    def __len__(self) -> int:
        return len(self.sorted) + len(self.added)


def _raw(hex_digests) -> np.ndarray:
    """S64 hex -> S32 raw digests: half the memory of the column as stored."""
    hexes = np.ascontiguousarray(hex_digests, "S64")
    return np.frombuffer(binascii.unhexlify(hexes.tobytes()), "S32") if len(hexes) else np.empty(0, "S32")
