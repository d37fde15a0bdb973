"""Pairs of embeddings closer than a cosine threshold (faiss range search), and the clusters of near duplicates
they make. Exact below EXACT_ROWS rows; above, an inverted-file index: near duplicates sit in the same or a
neighbouring cell, and no N x N matrix is ever formed."""

from __future__ import annotations

import numpy as np

NEAR_COSINE = 0.91  # mobilenet_v2: every mild copy above, every distinct photo below (bench/README.md)
EXACT_ROWS = 20000  # a flat index up to here; IVF above
QUERY_BLOCK = 4096  # queries per range search: bounds the result lists held at once
CELLS_PER_SQRT_ROW = 4  # IVF cells = 4 sqrt(N)
PROBES = 16  # IVF cells searched per query


def unit(x: np.ndarray) -> np.ndarray:
    """heads.unit_norm as the contiguous float32 rows faiss takes (imported here: heads is heavy for the CLI)."""
    from featpipe.heads import unit_norm

    return unit_norm(np.ascontiguousarray(x, np.float32))


def near_pairs(a: np.ndarray, threshold: float, b: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, cosine) for every pair at or above `threshold`: within `a` (i < j), or between a[i] and b[j]."""
    import faiss

    base = unit(a if b is None else b)
    queries = base if b is None else unit(a)
    index = _index(faiss, base)
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))  # faiss keeps only IP > radius
    found = []
    for start in range(0, len(queries), QUERY_BLOCK):
        lims, cos, j = index.range_search(queries[start:start + QUERY_BLOCK], radius)
        i = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims).astype(np.int64))
        keep = i < j if b is None else np.ones(len(i), bool)
        found.append((i[keep], j[keep], cos[keep]))
    if not found:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    return tuple(np.concatenate(col) for col in zip(*found))


def _index(faiss, base: np.ndarray):
    n, d = base.shape
    if n <= EXACT_ROWS:
        index = faiss.IndexFlatIP(d)
    else:
        cells = int(CELLS_PER_SQRT_ROW * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, cells, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(n, min(n, 64 * cells), replace=False)
        index.train(base[np.sort(sample)])
        index.nprobe = PROBES
    index.add(base)
    return index


def duplicate_groups(x: np.ndarray, groups: np.ndarray, threshold: float = NEAR_COSINE
                     ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Rows -> cluster ids that join `groups` (identical files) with near duplicates, transitively; and the near
    pairs found, as (row, row, cosine) between one representative row of each group."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    _, rep, group_of_row = np.unique(groups, return_index=True, return_inverse=True)
    i, j, cos = near_pairs(x[rep], threshold)  # one row per group: identical files are not searched twice
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(len(rep), len(rep)))
    _, cluster = connected_components(graph, directed=False)
    return cluster[group_of_row], (rep[i], rep[j], cos)
