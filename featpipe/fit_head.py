"""The fit-head command: extract what the cache lacks, fit a head on the training split of the cached features,
score it, save its bundle. `fit_and_score` is what the experiment's head row shares with it."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from featpipe.bundle import Bundle, output_dir, save
from featpipe.errors import UserError
from featpipe.extract import ExtractConfig
from featpipe.features import Features, load_features
from featpipe.heads import Head, HeadConfig, accuracy, cross_validate, fit_head
from featpipe.held_out import arrange, check_folders
from featpipe.registry import resolve
from featpipe.splits import Split, check_folds, check_fraction, check_k


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
        if self.cv is not None:
            check_k(self.cv)


def fit_and_save(cfg: FitConfig, progress: bool = True) -> dict:
    """Extract what the cache lacks, fit on the training split's cached features, save a bundle; the JSON report."""
    out = output_dir(cfg.out, f"{resolve(cfg.extract.backbone).name}-{cfg.head.kind}", cfg.extract.data_dir,
                     cfg.force)
    check_folders(cfg.extract, cfg.val_dir, cfg.test_dir)
    f = load_features(cfg.extract, progress)
    if cfg.group_duplicates:
        from featpipe.neighbours import duplicate_groups

        f = replace(f, groups=duplicate_groups(f.X, f.groups)[0])
    if cfg.features_dtype != "float32":  # the float32 rows are freed once converted
        f = replace(f, X=f.X.astype(cfg.features_dtype))
    arranged = arrange(f, cfg.extract, cfg.val_dir, cfg.test_dir, cfg.val_fraction, cfg.head.seed, progress)
    f, split, test = arranged.features, arranged.split, arranged.test
    if cfg.cv is not None:  # before any fitting: a bad --cv should fail in a second, not after the fit
        check_folds(f.y, f.classes, cfg.cv, groups=f.groups)
    head, scores = fit_and_score(f, split, replace(cfg.head, device=cfg.extract.device), cfg.cv)
    data = f.data()
    report = {"head": head.kind, "backbone": f.result.backbone, **scores,
              "fit_seconds": round(scores["fit_seconds"], 4),
              "n_train": int(len(split.train)), "n_val": int(len(split.val)), "classes": f.classes,
              "class_counts": data["class_counts"], "data_dir": data["dir"], **f.duplicates.to_json(),
              "c_search": head.report.get("c_search"),
              "validation": arranged.validation,
              "groups": "identical and near-duplicate files" if cfg.group_duplicates else "identical files"}
    if test is not None:
        report |= arranged.test_report(accuracy(head, test.X, test.y, np.arange(len(test.y))))
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


def head_bundle(f: Features, head: Head, metrics: dict) -> Bundle:
    """A head fitted on cached features `f` as the bundle fit-head saves."""
    key = f.result.cache.key
    return Bundle(key.backbone, key.weights_sha256, key.preprocessing, f.classes, head, metrics, data=f.data())


def _round(x: float | None) -> float | None:
    """Accuracies to 4 places, as finetune and scratch report them."""
    return None if x is None else round(x, 4)
