"""Which images validate a model and which test it: a random stratified split of DATA_DIR, a --val-dir folder, or
a --labels split column; a --test-dir folder (or the split column's test rows) is scored once at the end and never
used to choose anything. fit-head and finetune arrange their cached features here, so they agree."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from featpipe.dataset import class_folders, shipped_dataset
from featpipe.errors import UserError
from featpipe.extract import ExtractConfig, shard_patterns
from featpipe.features import Features, load_features
from featpipe.splits import Split, split_column, val_split


@dataclass
class Arranged:
    features: Features  # the training rows, then the validation rows
    split: Split
    test: Features | None  # its y already indexes features.classes
    test_in_train: int  # test images byte-identical to images of DATA_DIR (said on stderr)
    test_in_val: int  # test images byte-identical to validation images, which chose the model (said on stderr)
    validation: str  # what the report says was used

    def test_report(self, accuracy: float) -> dict:
        return {"test_accuracy": round(accuracy, 4), "n_test": len(self.test.y), "test_in_train": self.test_in_train,
                "test_in_val": self.test_in_val}


def check_folders(extract: ExtractConfig, val_dir: Path | None, test_dir: Path | None) -> None:
    """Before any image is embedded: a held-out folder that is not one, or has a class the training data lacks, is
    refused in one line (with --labels or shards the classes are known only once they are read: labels_in refuses
    them then)."""
    held: dict[str, list[str]] = {}  # flag -> its class folders, listed once
    for flag, d in (("--val-dir", val_dir), ("--test-dir", test_dir)):
        if d is None:
            continue
        if not Path(d).is_dir():
            raise UserError(f"{flag} {d} is not a directory")
        held[flag] = class_folders(Path(d))
        if not held[flag]:
            raise UserError(f"{flag} {d} has no class folders: a held-out set is {d}/<class>/<image>")
    for flag, d in (("DATA_DIR", extract.data_dir or shipped_dataset()), ("--val-dir", val_dir)):
        if test_dir is not None and d is not None and os.path.realpath(test_dir) == os.path.realpath(d):
            raise UserError(f"--test-dir is {flag}: a test set must be images that nothing was fitted or chosen on")
    if extract.labels is not None or shard_patterns(extract) is not None:
        return
    classes = set(class_folders(extract.data_dir or shipped_dataset()))
    for flag, found in held.items():
        unknown = sorted(set(found) - classes)
        if unknown:
            raise UserError(f"{flag} has class folder(s) the training data lacks: {', '.join(unknown[:5])}")


def arrange(f: Features, extract: ExtractConfig, val_dir: Path | None, test_dir: Path | None, val_fraction: float,
            seed: int, progress: bool = True, val_needed: bool = False) -> Arranged:
    """`val_needed`: the caller stops on validation accuracy (fine-tune, the experiment): it needs validation images,
    and --val-fraction 0 is no way out of a class too small to hold out."""
    test, given = None, bool(f.result.splits)
    if given:
        if val_dir is not None or test_dir is not None:
            raise UserError(f"{extract.labels} has a split column: it says which images are val and test, so "
                            f"--val-dir and --test-dir do not apply")
        f, split, test = given_split(f)
        how = f"split column of {extract.labels}"
        if not len(split.val) and not val_needed:  # fit-head goes on; the training commands refuse it themselves
            print("featpipe: the --labels split column has no val rows: val_accuracy is not measured",
                  file=sys.stderr)
    own = np.arange(len(f.y))  # DATA_DIR's rows, its validation share included; a --val-dir's come after them
    if not given and val_dir is not None:
        f, split = with_held_out(f, features_of(extract, val_dir, progress), "--val-dir")
        how = f"--val-dir {val_dir}"
    elif not given:
        split = val_split(f.y, f.classes, val_fraction, seed, zero_ok=not val_needed, groups=f.groups)
        how = f"random {val_fraction:g} split"
    if val_needed and not len(split.val):
        raise UserError(f"training stops early on validation accuracy, and the {how} gives no validation image")
    if test_dir is not None:
        test = features_of(extract, test_dir, progress)
    flag = "--test-dir" if test_dir else "the test split"
    if test is not None and not given:
        test = replace(test, y=labels_in(f, test, flag), classes=f.classes)
    if test is None:
        return Arranged(f, split, None, 0, 0, how)
    return Arranged(f, split, test, shared(f, own, test, flag), shared(f, split.val, test, flag, "validation"), how)


def features_of(extract: ExtractConfig, folder: Path, progress: bool) -> Features:
    return load_features(replace(extract, data_dir=Path(folder), labels=None), progress)  # its own class folders


def labels_in(f: Features, other: Features, flag: str) -> np.ndarray:
    """other's labels as indices into f's classes; a class f lacks is an error (the head cannot predict it)."""
    unknown = sorted(set(other.classes) - set(f.classes))
    if unknown:
        raise UserError(f"{flag} has class folder(s) the training data lacks: {', '.join(unknown[:5])}")
    index = {c: i for i, c in enumerate(f.classes)}
    return np.array([index[other.classes[i]] for i in other.y], np.int64)


def shared(f: Features, rows: np.ndarray, other: Features, flag: str, what: str = "training") -> int:
    """Images of `other` whose bytes are also in f's `rows`: said on stderr (they inflate its score)."""
    seen = {f.sha256[i] for i in rows}
    n = sum(digest in seen for digest in other.sha256)
    if n:
        print(f"warning: {n} image(s) of {flag} are byte-identical to {what} images: its score counts them",
              file=sys.stderr)
    return n


def with_held_out(f: Features, val: Features, flag: str) -> tuple[Features, Split]:
    """f's rows then val's, as one set whose split is exactly the two folders."""
    y = labels_in(f, val, flag)
    shared(f, np.arange(len(f.y)), val, flag)
    n = len(f.y)
    merged = replace(f, X=np.concatenate([f.X, val.X.astype(f.X.dtype)]), y=np.concatenate([f.y, y]),
                     paths=f.paths + val.paths, groups=np.concatenate([f.groups, val.groups + f.groups.max() + 1]),
                     sha256=f.sha256 + val.sha256)
    return merged, Split(np.arange(n), np.arange(n, n + len(y)))


def given_split(f: Features) -> tuple[Features, Split, Features | None]:
    """--labels' split column: (the train and val rows, their split, the test rows or None)."""
    which = np.array([f.result.splits.get(p, "") for p in f.paths])
    keep, split = split_column(which, f.y, f.classes)
    test = np.flatnonzero(which == "test")
    return rows_of(f, keep), split, (rows_of(f, test) if len(test) else None)


def rows_of(f: Features, rows: np.ndarray) -> Features:
    return replace(f, X=f.X[rows], y=f.y[rows], paths=[f.paths[i] for i in rows], groups=f.groups[rows],
                   sha256=[f.sha256[i] for i in rows])
