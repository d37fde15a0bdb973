"""Cached embeddings as a training set: (X, y, classes, paths) for the images the data dir holds *now*.

Rows come from the cache, but membership comes from this run's scan (`ExtractResult.members`): an image deleted
from the data dir keeps its cache row yet never reaches a head, and a moved image takes its new class folder.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from featpipe import feature_sets
from featpipe.cache import RowsGone
from featpipe.dataset import require_labels
from featpipe.extract import ExtractConfig, ExtractResult, shard_patterns
from featpipe.rows import require_finite
from featpipe.splits import content_groups


@dataclass
class Features:
    X: np.ndarray  # float32 (N, dim), rows sorted by path
    y: np.ndarray  # int64 (N,), index into classes
    classes: list[str]  # sorted class folder names
    paths: list[str]
    result: ExtractResult  # the extract run that guaranteed the rows (backbone, weights sha, preprocessing)
    groups: np.ndarray  # int64 (N,): equal for files with identical bytes (every split keeps them together)
    sha256: list[str]  # each row's content hash: its cache key
    more: list[ExtractResult] = field(default_factory=list)  # further backbones' runs: X holds them side by side

    @property
    def results(self) -> list[ExtractResult]:
        return [self.result, *self.more]

    def narrowed(self, parts: tuple[str, ...]) -> "Features":
        """The same images with only these parts' columns (feature_sets.py), in this order."""
        blocks, run = self.blocks(), {feature_sets.part_of(r.cache.key): r for r in self.results}
        return replace(self, X=feature_sets.side_by_side([blocks[p] for p in parts]), result=run[parts[0]],
                       more=[run[p] for p in parts[1:]])

    def blocks(self) -> dict[str, np.ndarray]:
        """Part name (feature_sets.part_of) -> its columns of X (views, no copy)."""
        ends = np.cumsum([r.dim for r in self.results])
        return {feature_sets.part_of(r.cache.key): self.X[:, e - r.dim:e] for r, e in zip(self.results, ends)}

    def data(self) -> dict:
        """What bundle.json and every training summary record about the training data."""
        return {"dir": self.result.data_dir, "class_counts": class_counts(self.y, self.classes)}

    @cached_property
    def duplicates(self) -> "Duplicates":  # reported when loaded, then recorded by fit-head and the experiment
        return find_duplicates(self.paths, [self.classes[i] for i in self.y], self.groups)


@dataclass(frozen=True)
class Duplicates:
    """Files whose bytes another file of the data dir already has; groups of copies under different classes."""

    files: int
    conflicts: list[list[tuple[str, str]]]  # per group: (path, class) of each copy

    def report(self, log=lambda s: print(s, file=sys.stderr)) -> None:
        """One line for the count, one naming the copies filed under two classes (both labels stay in training,
        on the same side of every split; which one is right only the user knows)."""
        if self.files:
            log(f"{self.files} duplicate file(s) (identical bytes to another file): each set of copies is kept on "
                f"one side of every split")
        if self.conflicts:
            first = " = ".join(f"{p} ({c})" for p, c in self.conflicts[0])
            more = f"; and {len(self.conflicts) - 1} more such set(s)" if len(self.conflicts) > 1 else ""
            log(f"warning: identical bytes under different classes: {first}{more}; both labels are kept: delete "
                f"the wrong copy")

    def to_json(self) -> dict:
        return {"duplicate_files": self.files, "label_conflicts": [[p for p, _ in g] for g in self.conflicts]}


def class_counts(y: np.ndarray, classes: list[str]) -> dict[str, int]:
    return dict(zip(classes, np.bincount(y, minlength=len(classes)).tolist()))


def find_duplicates(paths: list[str], labels: list[str], groups: np.ndarray) -> Duplicates:
    order = np.argsort(groups, kind="stable")
    sets = np.split(order, np.flatnonzero(np.diff(groups[order])) + 1) if len(order) else []
    conflicts = [[(paths[i], labels[i]) for i in s] for s in sets if len({labels[i] for i in s}) > 1]
    return Duplicates(int(len(paths) - len(sets)), conflicts)


def load_features(cfg: ExtractConfig, progress: bool = True, labelled: bool = True) -> Features:
    """Make sure the cache is complete (extracting what is missing), then read the current images' rows. Rows gone
    since (a shard that failed its checksums while read, set aside; a concurrent compact): extracted once more.
    labelled=False also takes a flat folder of images (label ""). A backbone of several names (`a,b`, `auto`:
    feature_sets.py) gives their rows side by side, each at unit length."""
    each = [dict(zip(("backbone", "tta"), feature_sets.backbone_and_tta(p, cfg.tta)))
            for p in feature_sets.parts(cfg.backbone)]
    if len(each) == 1:
        features = _load(replace(cfg, **each[0]), progress, labelled)
    else:
        features = _side_by_side([_load(replace(cfg, **e), progress, labelled) for e in each])
    features.duplicates.report()
    return features


def _load(cfg: ExtractConfig, progress: bool, labelled: bool) -> Features:
    if labelled and shard_patterns(cfg) is not None:  # their labels are known only once they are read
        cfg = replace(cfg, labelled=True)
    elif labelled and cfg.labels is None:
        require_labels(cfg.data_dir)
    try:
        return from_result(_extract(cfg, progress))
    except RowsGone:  # read once more, after extracting again what went missing
        return from_result(_extract(cfg, progress))


def _extract(cfg: ExtractConfig, progress: bool) -> ExtractResult:
    if progress:
        from featpipe.progress import run_extract

        return run_extract(cfg)
    from featpipe.extract import extract

    return extract(cfg)


def from_result(result: ExtractResult) -> Features:
    """extract() refuses a class folder without a valid image, so the members' labels are every class folder.
    Reads the embeddings of these images only, not the whole cache."""
    members = sorted(result.members, key=lambda m: m.path)  # path order: splits must not depend on hash order
    classes = sorted({m.label for m in members})
    label_id = {c: i for i, c in enumerate(classes)}
    X = result.cache.embeddings([m.sha256 for m in members])
    y = np.array([label_id[m.label] for m in members], dtype=np.int64)
    digests = [m.sha256 for m in members]
    require_finite(X, [m.path for m in members])
    return Features(X, y, classes, [m.path for m in members], result, content_groups(digests), digests)


def _side_by_side(each: list[Features]) -> Features:
    """One Features of several backbones' rows of the same images (a file one backbone's run skipped is left out
    of all)."""
    common = set.intersection(*(set(f.paths) for f in each))
    each = [f if len(f.paths) == len(common) else _only(f, common) for f in each]
    first = each[0]
    return replace(first, X=feature_sets.side_by_side([f.X for f in each]), more=[f.result for f in each[1:]])


def _only(f: Features, paths: set[str]) -> Features:
    keep = np.array([p in paths for p in f.paths])
    return replace(f, X=f.X[keep], y=f.y[keep], paths=[p for p, k in zip(f.paths, keep) if k],
                   groups=f.groups[keep], sha256=[h for h, k in zip(f.sha256, keep) if k])
