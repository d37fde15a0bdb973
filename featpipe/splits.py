"""Stratified splits that every head and backbone share, so their accuracies compare like for like.

Rows arrive sorted by path (featpipe.features), and the shuffles depend only on (seed, class index, class size):
the same member list gives the same split whatever the backbone, the head, or the order the cache stored rows in.
Every split and fold is made over content groups (`groups`: one id per row, the same for files with identical
bytes), so a file and its copy always land on the same side: a copy in validation would score as a seen image.
A group is stratified by its first row's class; with no duplicates every group is one row and the splits are the
row-level ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featpipe.errors import UserError


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # row indices, ascending
    val: np.ndarray


def val_split(y: np.ndarray, classes: list[str], fraction: float, seed: int, zero_ok: bool = True,
              groups: np.ndarray | None = None, small_in_train: bool = False) -> Split:
    """Per class, whole groups in a seeded order until round(fraction * n) images (at least 1, never every group)
    are in validation; fraction 0: none.

    `zero_ok`: whether the caller accepts fraction 0 (heads do; training needs a share for early stopping), which
    decides what a class too small to split is told to do. `small_in_train`: such a class stays whole in training
    instead (an internal hold-out, where the user has nothing to fix)."""
    check_fraction(fraction)
    present = [classes[c] for c in np.unique(y)]
    if len(present) < 2:
        raise UserError(f"a classifier needs at least 2 classes with images, found {len(present)}"
                        f"{': ' + present[0] if present else ''}")
    g = Groups.of(y, groups)
    val = [np.array([], np.int64)]
    for c, name in enumerate(classes):
        members = np.flatnonzero(g.stratum == c)  # this class's groups, in first-row order
        if not len(members):
            continue
        sizes = g.sizes[members]
        n_val = 0 if fraction == 0 else max(1, round(fraction * sizes.sum()))
        order = np.random.default_rng([seed, c]).permutation(len(members))
        take = int(np.searchsorted(np.cumsum(sizes[order]), n_val)) + 1 if n_val else 0
        if 2 <= len(members) <= take and len(members) < sizes.sum():
            take = len(members) - 1  # a large set of copies overshot the share: its last group stays in training
        if take >= len(members) and small_in_train:
            continue
        if take >= len(members):
            fix = "add images or pass --val-fraction 0" if zero_ok else "training needs at least 2 per class"
            distinct = f" ({len(members)} distinct)" if len(members) < sizes.sum() else ""
            raise UserError(f"class {name!r} has {sizes.sum()} image(s){distinct}: too few to hold out a validation "
                            f"share (--val-fraction {fraction}); {fix}")
        val.append(members[order[:take]])
    held = np.isin(g.row_group, np.concatenate(val))
    return Split(np.flatnonzero(~held), np.flatnonzero(held))


def split_column(which: np.ndarray, y: np.ndarray, classes: list[str]) -> tuple[np.ndarray, Split]:
    """A --labels split column (per row "train", "val" or "test") as (the train and val rows, their split); a class
    without training rows is refused, as it would silently vanish from the model."""
    keep = np.flatnonzero(which != "test")
    split = Split(np.flatnonzero(which[keep] == "train"), np.flatnonzero(which[keep] == "val"))
    missing = sorted(set(range(len(classes))) - set(y[keep][split.train].tolist()))
    if missing:
        raise UserError(f"the --labels split column puts no image of class {classes[missing[0]]!r} in train"
                        + (f" (nor of {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return keep, split


@dataclass(frozen=True)
class Groups:
    """Rows -> content groups, numbered in order of each group's first row."""

    row_group: np.ndarray  # (N,) group id of each row
    stratum: np.ndarray  # (G,) class of each group's first row
    sizes: np.ndarray  # (G,) rows per group

    @classmethod
    def of(cls, y: np.ndarray, groups: np.ndarray | None) -> "Groups":
        if groups is None:  # every row its own group
            return cls(np.arange(len(y)), np.asarray(y), np.ones(len(y), np.int64))
        row_group = first_seen_ids(groups)
        _, first = np.unique(row_group, return_index=True)  # ids count up in first-row order
        return cls(row_group, np.asarray(y)[first], np.bincount(row_group))

    def per_class(self, n_classes: int) -> np.ndarray:
        """Distinct groups per class (by stratum): what a fold count is bounded by."""
        return np.bincount(self.stratum, minlength=n_classes)


def first_seen_ids(values) -> np.ndarray:
    """One int per item, equal for equal values, numbered in the order each value first appears."""
    _, first, inverse = np.unique(np.asarray(values), return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse.ravel()]


def content_groups(keys: list[str]) -> np.ndarray:
    """One int per row, equal for equal keys (sha256 hex digests): the `groups` every split takes."""
    return first_seen_ids(np.asarray(keys, dtype=object).astype(str))


def check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1) (got {fraction})")


def check_seed(seed: int, what: str = "--seed") -> None:
    if not 0 <= seed < 2**32:  # numpy and torch seed with [0, 2**32)
        raise UserError(f"{what} must be in [0, 2**32) (got {seed})")


def check_k(k: int, what: str = "--cv") -> None:
    if k < 2:
        raise UserError(f"{what} must be at least 2 (got {k})")


def check_folds(y: np.ndarray, classes: list[str], k: int, what: str = "--cv",
                groups: np.ndarray | None = None) -> None:
    """K-fold CV needs k >= 2 and every class to have at least k distinct images (one per fold)."""
    check_k(k, what)
    counts = Groups.of(y, groups).per_class(len(classes))
    present = np.flatnonzero(counts)
    c = present[np.argmin(counts[present])]
    if counts[c] < k:
        advice = f"use {what} {counts[c]} or less" if counts[c] >= 2 else "add images to it, or leave it out"
        raise UserError(f"{what} {k} needs at least {k} distinct training images per class, but class "
                        f"{classes[c]!r} has {counts[c]}; {advice}")


def kfold(y: np.ndarray, k: int, seed: int, groups: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified K folds over groups, as row indices (callers check feasibility first with check_folds)."""
    g = Groups.of(y, groups)
    fold = stratified_folds(g.stratum, k, seed)[g.row_group]
    return [(np.flatnonzero(fold != i), np.flatnonzero(fold == i)) for i in range(k)]


def stratified_folds(strata: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The test fold of each item, as sklearn's StratifiedKFold(k, shuffle=True, random_state=seed) assigns them
    (tests check it is the same): importing sklearn costs more than a warm fit-head's whole budget."""
    encoded = first_seen_ids(strata)
    n_classes = int(encoded.max()) + 1
    ordered = np.sort(encoded)
    allocation = np.array([np.bincount(ordered[i::k], minlength=n_classes) for i in range(k)])
    rng, fold = np.random.RandomState(seed), np.empty(len(strata), np.int64)
    for c in range(n_classes):
        per_class = np.arange(k).repeat(allocation[:, c])
        rng.shuffle(per_class)
        fold[encoded == c] = per_class
    return fold
