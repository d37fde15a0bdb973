"""Stratified splits that every head and backbone share, so their accuracies compare like for like.

Rows arrive sorted by path (featpipe.features), and the shuffles depend only on (seed, class index, class size):
the same member list gives the same split whatever the backbone, the head, or the order the cache stored rows in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedKFold

from featpipe.errors import UserError


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # row indices, ascending
    val: np.ndarray


def val_split(y: np.ndarray, classes: list[str], fraction: float, seed: int, zero_ok: bool = True) -> Split:
    """Per class, round(fraction * n) images (at least 1, and never all) go to validation; fraction 0: none.

    `zero_ok`: whether the caller accepts fraction 0 (heads do; training needs a share for early stopping), which
    decides what a class too small to split is told to do."""
    check_fraction(fraction)
    present = [classes[c] for c in np.unique(y)]
    if len(present) < 2:
        raise UserError(f"a classifier needs at least 2 classes with images, found {len(present)}"
                        f"{': ' + present[0] if present else ''}")
    train, val = [np.array([], np.int64)], [np.array([], np.int64)]
    for c, name in enumerate(classes):
        idx = np.flatnonzero(y == c)
        if not len(idx):
            continue
        n_val = 0 if fraction == 0 else max(1, round(fraction * len(idx)))
        if n_val >= len(idx):
            fix = "add images or pass --val-fraction 0" if zero_ok else "training needs at least 2 per class"
            raise UserError(f"class {name!r} has {len(idx)} image(s): too few to hold out a validation share "
                            f"(--val-fraction {fraction}); {fix}")
        order = np.random.default_rng([seed, c]).permutation(len(idx))
        val.append(idx[order[:n_val]])
        train.append(idx[order[n_val:]])
    return Split(np.sort(np.concatenate(train)), np.sort(np.concatenate(val)))


def check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1) (got {fraction})")


def check_k(k: int, what: str = "--cv") -> None:
    if k < 2:
        raise UserError(f"{what} must be at least 2 (got {k})")


def check_folds(y: np.ndarray, classes: list[str], k: int, what: str = "--cv") -> None:
    """K-fold CV needs k >= 2 and every class to have at least k images (one per fold)."""
    check_k(k, what)
    counts = np.bincount(y, minlength=len(classes))
    present = np.flatnonzero(counts)
    c = present[np.argmin(counts[present])]
    if counts[c] < k:
        raise UserError(f"{what} {k} needs at least {k} training images per class, but class {classes[c]!r} has "
                        f"{counts[c]}; use a smaller {what}")


def kfold(y: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified K folds (callers check feasibility first with check_folds)."""
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(skf.split(np.zeros(len(y)), y))
