"""The fit-head command: extract what the cache lacks, fit a head on the training split of the cached features,
score it, save its bundle. `fit_and_score` is what the experiment's head row shares with it."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from featpipe import feature_sets
from featpipe.bundle import Bundle, output_dir, save
from featpipe.errors import UserError
from featpipe.extract import ExtractConfig
from featpipe.feature_sets import Choice
from featpipe.features import Features, load_features
from featpipe.heads import Head, HeadConfig, accuracy, cross_validate, fit_head
from featpipe.held_out import arrange, check_folders
from featpipe.registry import resolve
from featpipe.splits import Split, check_folds, check_fraction, check_k, check_seed


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
        if self.extract.backbone == feature_sets.AUTO and self.head.kind != "logistic":
            raise UserError("--backbone auto chooses with the logistic head's inner CV: use --head logistic, or "
                            "name the backbones (--backbone a,b)")
        if self.extract.backbone == feature_sets.AUTO and self.extract.tta != "none":
            raise UserError("--backbone auto already tries every backbone flip-averaged: drop --tta, or name the "
                            "parts (--backbone a:flip,b)")
        if self.features_dtype not in ("float32", "float16"):
            raise UserError(f"--features-dtype must be float32 or float16 (got {self.features_dtype!r})")
        check_fraction(self.val_fraction)
        check_seed(self.head.seed)
        if self.cv is not None:
            check_k(self.cv)


def fit_and_save(cfg: FitConfig, progress: bool = True) -> dict:
    """Extract what the cache lacks, fit on the training split's cached features, save a bundle; the JSON report."""
    auto = cfg.extract.backbone == feature_sets.AUTO
    parts = feature_sets.parts(cfg.extract.backbone)
    out = output_dir(cfg.out, f"{_bundle_name(parts, auto, cfg.extract.tta)}-{cfg.head.kind}", cfg.extract.data_dir,
                     cfg.force)
    check_folders(cfg.extract, cfg.val_dir, cfg.test_dir)
    extract = replace(cfg.extract, backbone=",".join(parts))  # auto's list made once (its notices said once)
    f = load_features(extract, progress)
    extract_seconds = f.extract_seconds()
    if cfg.group_duplicates:
        from featpipe.neighbours import duplicate_groups

        f = replace(f, groups=duplicate_groups(f.X, f.groups)[0])
    if cfg.features_dtype != "float32":  # the float32 rows are freed once converted
        f = replace(f, X=f.X.astype(cfg.features_dtype))
    arranged = arrange(f, extract, cfg.val_dir, cfg.test_dir, cfg.val_fraction, cfg.head.seed, progress)
    f, split, test = arranged.features, arranged.split, arranged.test
    if cfg.cv is not None:  # before any fitting: a bad --cv should fail in a second, not after the fit
        check_folds(f.y, f.classes, cfg.cv, groups=f.groups)
    head, scores, choice = fit_and_score(f, split, replace(cfg.head, device=cfg.extract.device), cfg.cv, auto)
    if choice is not None:
        f = f.narrowed(choice.parts)
        test = None if test is None else test.narrowed(choice.parts)
    data = f.data()
    report = {"head": head.kind, "backbone": feature_sets.name(tuple(feature_sets.part_of(r.cache.key)
                                                                     for r in f.results)), **scores,
              "fit_seconds": round(scores["fit_seconds"], 4),
              "n_train": int(len(split.train)), "n_val": int(len(split.val)), "classes": f.classes,
              "class_counts": data["class_counts"], "data_dir": data["dir"], **f.duplicates.to_json(),
              "c_search": head.report.get("c_search"),
              "validation": arranged.validation,
              "groups": "identical and near-duplicate files" if cfg.group_duplicates else "identical files"}
    if len(parts) > 1:  # each backbone's extract run (scan only, once cached); auto: what was tried
        report["extract_seconds"] = extract_seconds
    if choice is not None:
        report["feature_sets"] = feature_sets.summary(choice)
    if test is not None:
        report |= arranged.test_report(accuracy(head, test.X, test.y, np.arange(len(test.y))))
    metrics = {k: v for k, v in report.items() if k not in ("head", "backbone", "classes", "class_counts", "data_dir",
                                                            "label_conflicts", "c_search", "validation",
                                                            "groups", "feature_sets", "extract_seconds")}
    bundle = head_bundle(f, head, metrics | {"cv_folds": cfg.cv, "val_fraction": cfg.val_fraction,
                                             "seed": cfg.head.seed})
    return report | {"model_path": str(save(bundle, out))}


def fit_and_score(f: Features, split: Split, cfg: HeadConfig, cv: int | None, auto: bool = False,
                  ) -> tuple[Head, dict, Choice | None]:
    """Fit on the training rows and score both sides; with `cv`, K-fold CV over every labelled image (the usual
    meaning of CV accuracy: separate fits, so the val accuracy never sees them). fit_seconds times the final fit
    alone (standardiser + C search, or MLP training), not the CV refits. `auto`: f holds several backbones side by
    side; the head is feature_sets.choose's, scored on the chosen columns, and the CV makes the choice per fold."""
    t0 = time.perf_counter()
    choice = None
    if auto:
        blocks = f.blocks()
        choice = feature_sets.choose(blocks, f.y, len(f.classes), cfg, f.groups, split.train)
        head, f = choice.head, f.narrowed(choice.parts)
    else:
        head = fit_head(f.X, f.y, len(f.classes), cfg, f.groups, rows=split.train)
    seconds = time.perf_counter() - t0
    if cv and auto:
        mean, std, _picks = feature_sets.nested_cv(blocks, f.y, f.classes, cv, cfg, f.groups)
    else:
        mean, std = cross_validate(f.X, f.y, f.classes, cv, cfg, f.groups) if cv else (None, None)
    return head, {"train_accuracy": _round(accuracy(head, f.X, f.y, split.train)),
                  "val_accuracy": _round(accuracy(head, f.X, f.y, split.val)),
                  "cv_accuracy_mean": _round(mean), "cv_accuracy_std": _round(std), "fit_seconds": seconds}, choice


def head_bundle(f: Features, head: Head, metrics: dict) -> Bundle:
    """A head fitted on cached features `f` as the bundle fit-head saves."""
    key = f.result.cache.key
    more = [{"backbone": r.cache.key.backbone, "weights_sha256": r.cache.key.weights_sha256,
             "preprocessing": r.cache.key.preprocessing, "tta": r.cache.key.tta} for r in f.more]
    return Bundle(key.backbone, key.weights_sha256, key.preprocessing, f.classes, head, metrics, data=f.data(),
                  more=more, tta=key.tta)


def _bundle_name(parts: tuple[str, ...], auto: bool, tta: str) -> str:
    """models/<this>-<head>: auto, a+b, or the backbone's registry name (-flip with --tta flip)."""
    if auto:
        return "auto"
    names = [resolve(b).name + ("-flip" if t == "flip" else "")
             for b, t in (feature_sets.backbone_and_tta(p, tta) for p in parts)]
    return "+".join(names)


def _round(x: float | None) -> float | None:
    """Accuracies to 4 places, as finetune and scratch report them."""
    return None if x is None else round(x, 4)
