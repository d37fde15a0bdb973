"""Cache rows, column-wise: what a journal record, a shard and a reader pass around."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featpipe.errors import UserError


@dataclass
class Rows:
    """sha256 hex, embedding, path (where the file was when embedded), label (its class folder then)."""

    sha256: list[str]
    embeddings: np.ndarray
    paths: list[str]
    labels: list[str]

    @classmethod
    def empty(cls, dim: int) -> "Rows":
        return cls([], np.empty((0, dim), np.float32), [], [])

    @classmethod
    def concat(cls, parts: list["Rows"], dim: int) -> "Rows":
        if not parts:
            return cls.empty(dim)
        return cls([h for p in parts for h in p.sha256], np.concatenate([p.embeddings for p in parts]),
                   [x for p in parts for x in p.paths], [x for p in parts for x in p.labels])

    def __len__(self) -> int:
        return len(self.sha256)

    def take(self, idx) -> "Rows":
        idx = np.asarray(idx, np.int64)
        return Rows([self.sha256[i] for i in idx], self.embeddings[idx], [self.paths[i] for i in idx],
                    [self.labels[i] for i in idx])

    def unique(self) -> "Rows":
        """The first row of each hash (readers list shards before journals, so a published row wins)."""
        _, first = np.unique(np.array(self.sha256, "S64"), return_index=True)
        return self if len(first) == len(self) else self.take(np.sort(first))


def require_finite(X: np.ndarray, paths: list) -> None:
    """NaN or inf embeddings (broken weights) would train and predict nonsense without an error: refuse them."""
    bad = np.flatnonzero(~np.isfinite(X).all(axis=1)) if len(X) else []
    if len(bad):
        raise UserError(f"{len(bad)} embedding(s) are not finite (NaN or inf), e.g. {paths[bad[0]]}: the backbone's "
                        f"weights are broken")
