"""Cached embeddings as a training set: (X, y, classes, paths) for the images the data dir holds *now*.

Rows come from the cache, but membership comes from this run's scan (`ExtractResult.members`): an image deleted
from the data dir keeps its cache row yet never reaches a head, and a moved image takes its new class folder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featpipe.extract import ExtractConfig, ExtractResult


@dataclass
class Features:
    X: np.ndarray  # float32 (N, dim), rows sorted by path
    y: np.ndarray  # int64 (N,), index into classes
    classes: list[str]  # sorted class folder names
    paths: list[str]
    result: ExtractResult  # the extract run that guaranteed the rows (backbone, weights sha, preprocessing)


def load_features(cfg: ExtractConfig, progress: bool = True) -> Features:
    """Make sure the cache is complete (extracting what is missing), then gather the current images' rows."""
    if progress:
        from featpipe.progress import run_extract

        result = run_extract(cfg)
    else:
        from featpipe.extract import extract

        result = extract(cfg)
    return from_result(result)


def from_result(result: ExtractResult) -> Features:
    """extract() refuses a class folder without a valid image, so the members' labels are every class folder.

    The rows are the ones extract() just committed (it read and verified the whole cache already)."""
    rows = result.rows
    index = {h: i for i, h in enumerate(rows.sha256)}
    members = sorted(result.members, key=lambda m: m.path)  # path order: splits must not depend on hash order
    classes = sorted({m.label for m in members})
    label_id = {c: i for i, c in enumerate(classes)}
    X = rows.embeddings[[index[m.sha256] for m in members]].astype(np.float32, copy=False)
    y = np.array([label_id[m.label] for m in members], dtype=np.int64)
    return Features(X, y, classes, [m.path for m in members], result)
