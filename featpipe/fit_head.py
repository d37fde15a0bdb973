"""The fit-head command: extract what the cache lacks, fit a head on the training split of the cached features,
score it, save its bundle. `fit_and_score` is what the experiment's head row shares with it."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from featpipe.bundle import Bundle, output_dir, save
from featpipe.dataset import class_folders, shipped_dataset
from featpipe.errors import UserError
from featpipe.extract import ExtractConfig
from featpipe.features import Features, load_features
from featpipe.heads import Head, HeadConfig, accuracy, cross_validate, fit_head
from featpipe.registry import resolve
from featpipe.splits import Split, check_folds, check_fraction, check_k, val_split


@dataclass
class FitConfig:
    extract: ExtractConfig
    head: HeadConfig
    cv: int | None = None
    val_fraction: float = 0.2
    out: Path | None = None  # default models/<backbone>-<head>
    force: bool = False  # replace a bundle at `out` trained on another data dir
    features_dtype: str = "float32"  # float16: X held at half the memory while fitting
    val_dir: Path | None = None  # a separate validation folder instead of the random split
    test_dir: Path | None = None  # scored once at the end, never used to choose anything
    group_duplicates: bool = False  # near duplicates (neighbours.py) join identical files on one side of splits

    def __post_init__(self) -> None:  # before extraction: a typo should not cost the whole extract first
        if self.features_dtype not in ("float32", "float16"):
            raise UserError(f"--features-dtype must be float32 or float16 (got {self.features_dtype!r})")
        check_fraction(self.val_fraction)
        for flag, d in (("--val-dir", self.val_dir), ("--test-dir", self.test_dir)):
            if d is not None and not Path(d).is_dir():
                raise UserError(f"{flag} {d} is not a directory")
        if self.cv is not None:
            check_k(self.cv)


def fit_and_save(cfg: FitConfig, progress: bool = True) -> dict:
    """Extract what the cache lacks, fit on the training split's cached features, save a bundle; the JSON report."""
    out = output_dir(cfg.out, f"{resolve(cfg.extract.backbone).name}-{cfg.head.kind}", cfg.extract.data_dir,
                     cfg.force)
    _check_held_out_classes(cfg)
    f = load_features(cfg.extract, progress)
    if cfg.group_duplicates:
        from featpipe.neighbours import duplicate_groups

        f = replace(f, groups=duplicate_groups(f.X, f.groups)[0])
    if cfg.features_dtype != "float32":  # the float32 rows are freed once converted
        f = replace(f, X=f.X.astype(cfg.features_dtype))
    test = None
    if f.result.splits:
        if cfg.val_dir is not None or cfg.test_dir is not None:
            raise UserError(f"{cfg.extract.labels} has a split column: it says which images are val and test, so "
                            f"--val-dir and --test-dir do not apply")
        f, split, test = given_split(f)
    elif cfg.val_dir is not None:
        f, split = with_held_out(f, _features_of(cfg, cfg.val_dir, progress), "--val-dir")
    else:
        split = val_split(f.y, f.classes, cfg.val_fraction, cfg.head.seed, groups=f.groups)
    if cfg.cv is not None:  # before any fitting: a bad --cv should fail in a second, not after the fit
        check_folds(f.y, f.classes, cfg.cv, groups=f.groups)
    head, scores = fit_and_score(f, split, replace(cfg.head, device=cfg.extract.device), cfg.cv)
    data = f.data()
    report = {"head": head.kind, "backbone": f.result.backbone, **scores,
              "fit_seconds": round(scores["fit_seconds"], 4),
              "n_train": int(len(split.train)), "n_val": int(len(split.val)), "classes": f.classes,
              "class_counts": data["class_counts"], "data_dir": data["dir"], **f.duplicates.to_json(),
              "c_search": head.report.get("c_search"),
              "validation": _validation(cfg, bool(f.result.splits)),
              "groups": "identical and near-duplicate files" if cfg.group_duplicates else "identical files"}
    if cfg.test_dir is not None:
        test = _features_of(cfg, cfg.test_dir, progress)
    if test is not None:
        report |= score_held_out(head, f, test, "--test-dir" if cfg.test_dir else "the test split")
    metrics = {k: v for k, v in report.items() if k not in ("head", "backbone", "classes", "class_counts", "data_dir",
                                                            "label_conflicts", "c_search", "validation",
                                                            "groups")}
    bundle = head_bundle(f, head, metrics | {"cv_folds": cfg.cv, "val_fraction": cfg.val_fraction,
                                             "seed": cfg.head.seed})
    return report | {"model_path": str(save(bundle, out))}


def fit_and_score(f: Features, split: Split, cfg: HeadConfig, cv: int | None) -> tuple[Head, dict]:
    """Fit on the training rows and score both sides; with `cv`, K-fold CV over every labelled image (the usual
    meaning of CV accuracy: separate fits, so the val accuracy never sees them). fit_seconds times the final fit
    alone (standardiser + C search, or MLP training), not the CV refits."""
    t0 = time.perf_counter()
    head = fit_head(f.X, f.y, len(f.classes), cfg, f.groups, rows=split.train)
    seconds = time.perf_counter() - t0
    mean, std = cross_validate(f.X, f.y, f.classes, cv, cfg, f.groups) if cv else (None, None)
    return head, {"train_accuracy": _round(accuracy(head, f.X, f.y, split.train)),
                  "val_accuracy": _round(accuracy(head, f.X, f.y, split.val)),
                  "cv_accuracy_mean": _round(mean), "cv_accuracy_std": _round(std), "fit_seconds": seconds}


def _check_held_out_classes(cfg: FitConfig) -> None:
    """Before any image is embedded: a held-out class the training data lacks is refused in one line (with
    --labels the classes are known only once the file is read: _labels_in refuses them then)."""
    if cfg.extract.labels is not None:
        return
    classes = set(class_folders(cfg.extract.data_dir or shipped_dataset()))
    for flag, folder in (("--val-dir", cfg.val_dir), ("--test-dir", cfg.test_dir)):
        unknown = sorted(set(class_folders(Path(folder))) - classes) if folder is not None else []
        if unknown:
            raise UserError(f"{flag} has class folder(s) the training data lacks: {', '.join(unknown[:5])}")


def _features_of(cfg: FitConfig, folder: Path, progress: bool) -> Features:
    return load_features(replace(cfg.extract, data_dir=Path(folder), labels=None), progress)  # its own folders


def _labels_in(f: Features, other: Features, flag: str) -> np.ndarray:
    """other's labels as indices into f's classes; a class f lacks is an error (the head cannot predict it)."""
    unknown = sorted(set(other.classes) - set(f.classes))
    if unknown:
        raise UserError(f"{flag} has class folder(s) the training data lacks: {', '.join(unknown[:5])}")
    index = {c: i for i, c in enumerate(f.classes)}
    return np.array([index[other.classes[i]] for i in other.y], np.int64)


def _shared(f: Features, other: Features, flag: str) -> int:
    """Images of `other` whose bytes are also in the training data: said on stderr (they inflate its score)."""
    train = {m.sha256 for m in _members(f)}
    n = sum(m.sha256 in train for m in _members(other))
    if n:
        print(f"warning: {n} image(s) of {flag} are byte-identical to training images: its score counts them",
              file=sys.stderr)
    return n


def with_held_out(f: Features, val: Features, flag: str) -> tuple[Features, Split]:
    """f's rows then val's, as one set whose split is exactly the two folders."""
    y = _labels_in(f, val, flag)
    _shared(f, val, flag)
    n = len(f.y)
    merged = replace(f, X=np.concatenate([f.X, val.X.astype(f.X.dtype)]), y=np.concatenate([f.y, y]),
                     paths=f.paths + val.paths, groups=np.concatenate([f.groups, val.groups + f.groups.max() + 1]))
    return merged, Split(np.arange(n), np.arange(n, n + len(y)))


def score_held_out(head: Head, f: Features, test: Features, flag: str) -> dict:
    y = _labels_in(f, test, flag)
    return {"test_accuracy": _round(accuracy(head, test.X, y, np.arange(len(y)))), "n_test": len(y),
            "test_in_train": _shared(f, test, flag)}


def head_bundle(f: Features, head: Head, metrics: dict) -> Bundle:
    """A head fitted on cached features `f` as the bundle fit-head saves."""
    key = f.result.cache.key
    return Bundle(key.backbone, key.weights_sha256, key.preprocessing, f.classes, head, metrics, data=f.data())


def _members(f: Features) -> list:
    """f's own rows' members (a split of one extract run shares its members list)."""
    paths = set(f.paths)
    return [m for m in f.result.members if m.path in paths]


def given_split(f: Features) -> tuple[Features, Split, Features | None]:
    """--labels' split column: (the train and val rows, their split, the test rows or None)."""
    which = np.array([f.result.splits.get(p, "") for p in f.paths])
    keep, test = np.flatnonzero(which != "test"), np.flatnonzero(which == "test")
    split = Split(np.flatnonzero(which[keep] == "train"), np.flatnonzero(which[keep] == "val"))
    missing = sorted(set(range(len(f.classes))) - set(f.y[keep][split.train].tolist()))
    if missing:
        raise UserError(f"the --labels split column puts no image of class {f.classes[missing[0]]!r} in train"
                        + (f" (nor of {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if not len(split.val):
        print("featpipe: the --labels split column has no val rows: val_accuracy is not measured", file=sys.stderr)
    return _rows(f, keep), split, (_rows(f, test) if len(test) else None)


def _rows(f: Features, rows: np.ndarray) -> Features:
    return replace(f, X=f.X[rows], y=f.y[rows], paths=[f.paths[i] for i in rows], groups=f.groups[rows])


def _validation(cfg: FitConfig, given: bool) -> str:
    if given:
        return f"split column of {cfg.extract.labels}"
    return f"--val-dir {cfg.val_dir}" if cfg.val_dir else f"random {cfg.val_fraction:g} split"


def _round(x: float | None) -> float | None:
    """Accuracies to 4 places, as finetune and scratch report them."""
    return None if x is None else round(x, 4)
