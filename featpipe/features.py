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
from featpipe.errors import UserError
from featpipe.extract import ExtractConfig, ExtractResult, shard_patterns
from featpipe.hardware import available_memory
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

    def extract_seconds(self) -> dict[str, float]:
        """Part name -> what its extract run took (its scan alone, once cached): auto's and a,b's added cost."""
        return {feature_sets.part_of(r.cache.key): round(r.seconds, 2) for r in self.results}

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
    each = [replace(cfg, **dict(zip(("backbone", "tta"), feature_sets.backbone_and_tta(p, cfg.tta))))
            for p in feature_sets.parts(cfg.backbone)]
    if len(each) == 1:
        cfg = _checked(each[0], labelled)
        features = _read(cfg, _extract(cfg, progress), progress)
    else:
        features = _side_by_side([_checked(c, labelled) for c in each], progress)
    features.duplicates.report()
    return features


def _checked(cfg: ExtractConfig, labelled: bool) -> ExtractConfig:
    if labelled and shard_patterns(cfg) is None and cfg.labels is None:  # (shards' labels: known once read)
        require_labels(cfg.data_dir)
    return replace(cfg, labelled=labelled)


def _read(cfg: ExtractConfig, result: ExtractResult, progress: bool) -> Features:
    try:
        return from_result(result)
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
    members = list(result.members.by_path())  # path order: splits must not depend on hash order
    classes = sorted({m.label for m in members})
    label_id = {c: i for i, c in enumerate(classes)}
    X = result.cache.embeddings([m.sha256 for m in members])
    y = np.array([label_id[m.label] for m in members], dtype=np.int64)
    digests = [m.sha256 for m in members]
    require_finite(X, [m.path for m in members])
    return Features(X, y, classes, [m.path for m in members], result, content_groups(digests), digests)


def _side_by_side(cfgs: list[ExtractConfig], progress: bool) -> Features:
    """One Features of several backbones' rows of the same images (a file one backbone's run skipped is left out
    of all). Every part is extracted before any is read: the array's size is then known, it is checked against
    free memory, allocated once and filled a part at a time (peak: it and one part's rows)."""
    results = [_extract(c, progress) for c in cfgs]
    paths = sorted(set.intersection(*({m.path for m in r.members} for r in results)))
    X = _allocate(len(paths), [r.dim for r in results], cfgs)
    first, more, at = None, [], 0
    for cfg, result in zip(cfgs, results):
        f = _read(cfg, result, progress)
        if f.paths != paths:
            f = _only(f, set(paths))
        if f.paths != paths:  # extracted again (rows gone) and the data dir changed meanwhile
            raise UserError(f"{cfg.data_dir or 'the input'} changed while its rows were read: run again")
        feature_sets.unit_rows_into(X[:, at:at + f.X.shape[1]], f.X)
        at += f.X.shape[1]
        if first is None:
            first = replace(f, X=X)
        else:
            more.append(f.result)
        del f  # this part's rows go before the next part is read
    return replace(first, more=more)


def _allocate(rows: int, dims: list[int], cfgs: list[ExtractConfig]) -> np.ndarray:
    need, free = rows * (sum(dims) + max(dims)) * 4, available_memory()  # the array and the part being read
    if free is not None and need > free:
        raise UserError(f"{rows:,} images x {sum(dims):,} features side by side ({len(cfgs)} parts: "
                        f"{','.join(feature_sets.part_of(c) for c in cfgs)}) need {_size(need)} with one part "
                        f"being read, more than the {_size(free)} free; name fewer backbones")
    return np.empty((rows, sum(dims)), np.float32)


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _only(f: Features, paths: set[str]) -> Features:
    keep = np.array([p in paths for p in f.paths])
    return replace(f, X=f.X[keep], y=f.y[keep], paths=[p for p, k in zip(f.paths, keep) if k],
                   groups=f.groups[keep], sha256=[h for h, k in zip(f.sha256, keep) if k])
