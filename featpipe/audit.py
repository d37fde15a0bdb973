"""`featpipe audit`: what the cached embeddings say about a data set before anything is trained on it.

Exact duplicates (same bytes), near duplicates (cosine >= --near, neighbours.py), training images that reappear in
--test-dir (leaks), likely label errors (confident learning, cleanlab, on out-of-fold probabilities from the
fit-head logistic procedure), and K-fold accuracy with and without duplicates kept in one fold: how much they
inflate the score. audit_report.py writes the files."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from featpipe.dataset import shipped_dataset
from featpipe.errors import UserError
from featpipe.extract import ExtractConfig
from featpipe.features import Features, load_features
from featpipe.heads import HeadConfig, out_of_fold_proba
from featpipe.neighbours import NEAR_COSINE, duplicate_groups, near_pairs
from featpipe.splits import check_folds, check_k, check_seed, kfold


@dataclass
class AuditConfig:
    extract: ExtractConfig
    test_dir: Path | None = None  # a held-out folder (labelled or not): its images found in training are leaks
    near: float = NEAR_COSINE  # cosine at or above which two different files are the same picture
    folds: int = 5  # out-of-fold probabilities and the two CV accuracies
    seed: int = 0
    out: Path | None = None  # audit.json, audit.md, map.png, audit.html

    def __post_init__(self) -> None:  # before extraction: a typo should not cost an extract first
        if not 0.0 < self.near <= 1.0:
            raise UserError(f"--near must be a cosine in (0, 1] (got {self.near})")
        check_k(self.folds, "--folds")
        check_seed(self.seed)
        if self.test_dir is not None and not Path(self.test_dir).is_dir():
            raise UserError(f"--test-dir {self.test_dir} is not a directory")
        if self.out is not None:  # now: not after the whole audit
            try:
                Path(self.out).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"--out {self.out}: {e.strerror}") from None
        data = self.extract.data_dir or shipped_dataset()
        if self.test_dir is not None and os.path.realpath(self.test_dir) == os.path.realpath(data):
            raise UserError(f"--test-dir {self.test_dir} is DATA_DIR itself: every image would leak into itself")


def audit(cfg: AuditConfig, progress: bool = True) -> dict:
    """The audit report (audit.json's content); rows come from the cache, extracting only what it lacks."""
    t0 = time.perf_counter()
    f = load_features(cfg.extract, progress)
    test = None
    if cfg.test_dir is not None:
        test = load_features(replace(cfg.extract, data_dir=Path(cfg.test_dir), labels=None), progress,
                             labelled=False)  # read as a folder: --labels describes DATA_DIR only
    extract_seconds = time.perf_counter() - t0
    found = examine(f, test, cfg)
    report = {"data_dir": f.result.data_dir, "test_dir": str(cfg.test_dir) if cfg.test_dir else None,
              "backbone": f.result.backbone, "images": len(f.y), "classes": f.classes, "near_threshold": cfg.near,
              **found, "seconds": {"extract": round(extract_seconds, 3), **found["seconds"]}}
    if cfg.out is not None:
        from featpipe.audit_report import write

        report["files"] = write(Path(cfg.out), report, f)
    return report


def examine(f: Features, test: Features | None, cfg: AuditConfig) -> dict:
    """Duplicate sets, leaks, label issues and the two CV accuracies of rows already loaded (what
    bench/audit_scale.py times)."""
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    clusters, pairs = duplicate_groups(f.X, f.groups, cfg.near)
    sets = duplicate_sets(f, clusters, pairs)
    leaks = leaked(f, test, cfg.near) if test is not None else []
    seconds["duplicates"] = time.perf_counter() - t0
    cv = {"folds": cfg.folds, "grouped": None, "ungrouped": None, "duplicate_groups": int(clusters.max()) + 1}
    issues, notes = [], []
    ungrouped_why, grouped_why = _unfoldable(f, cfg.folds, None), _unfoldable(f, cfg.folds, clusters)
    if ungrouped_why:  # duplicates and leaks stand; what needs folds is said, not attempted
        notes.append(f"no label issues or CV: {ungrouped_why}")
    else:
        t0 = time.perf_counter()
        head = HeadConfig(kind="logistic", seed=cfg.seed)
        groups = f.groups if grouped_why else clusters  # near sets too large to fold: identical files only
        proba = out_of_fold_proba(f.X, f.y, f.classes, cfg.folds, head, groups)
        issues = label_issues(f, proba)
        seconds["label_issues"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if grouped_why:
            notes.append(f"no grouped CV: with near duplicates joined, {grouped_why}")
        else:
            cv["grouped"] = _fold_accuracy(proba, f.y, kfold(f.y, cfg.folds, cfg.seed, clusters))
        no_sets = len(np.unique(clusters)) == len(f.y)  # every file its own group already: same folds, same fits
        cv["ungrouped"] = cv["grouped"] if no_sets and cv["grouped"] else _ungrouped(f, cfg.folds, head)
        seconds["cv"] = time.perf_counter() - t0
    return {"duplicates": sets, "leaks": leaks, "label_issues": issues, "cv": cv, "notes": notes,
            "seconds": {k: round(v, 3) for k, v in seconds.items()}}


def _unfoldable(f: Features, k: int, groups: np.ndarray | None) -> str | None:
    """Why K folds cannot be made (fewer than 2 classes, a class with fewer than K distinct images), or None."""
    if len(np.unique(f.y)) < 2:
        return "a classifier needs at least 2 classes with images"
    try:
        check_folds(f.y, f.classes, k, "--folds", groups)
    except UserError as e:
        return str(e)
    return None


def duplicate_sets(f: Features, clusters: np.ndarray, pairs: tuple) -> list[dict]:
    """One entry per set of two or more files that are the same picture: "exact" when all share their bytes,
    else "near" with the lowest cosine among the pairs that joined it. Sets across classes come first."""
    weakest = {}
    for a, _, cos in zip(*pairs):
        weakest[clusters[a]] = min(weakest.get(clusters[a], 1.0), float(cos))
    order = np.argsort(clusters, kind="stable")
    sets = []
    for rows in np.split(order, np.flatnonzero(np.diff(clusters[order])) + 1):
        if len(rows) < 2:
            continue
        labels = [f.classes[f.y[r]] for r in rows]
        exact = len(set(f.groups[rows].tolist())) == 1
        sets.append({"kind": "exact" if exact else "near", "paths": [f.paths[r] for r in rows], "labels": labels,
                     "across_classes": len(set(labels)) > 1,
                     "min_cosine": 1.0 if exact else round(weakest[clusters[rows[0]]], 4)})
    return sorted(sets, key=lambda s: (not s["across_classes"], s["kind"], -len(s["paths"]), s["paths"][0]))


def leaked(f: Features, test: Features, near: float) -> list[dict]:
    """Each test image that is also a training image: its closest training file, exact (same bytes) or near."""
    train_of = {}
    for path, sha in zip(f.paths, f.sha256):
        train_of.setdefault(sha, path)
    out = {t: {"train": train_of[sha], "test": t, "kind": "exact", "cosine": 1.0}
           for t, sha in zip(test.paths, test.sha256) if sha in train_of}
    i, j, cos = near_pairs(test.X, near, f.X)
    for k in np.argsort(-cos, kind="stable"):
        t = test.paths[i[k]]
        if t not in out:
            out[t] = {"train": f.paths[j[k]], "test": t, "kind": "near", "cosine": round(float(cos[k]), 4)}
    return sorted(out.values(), key=lambda leak: (leak["kind"], leak["test"]))


def label_issues(f: Features, proba: np.ndarray) -> list[dict]:
    """Images whose given label confident learning doubts (cleanlab.filter.find_label_issues), most likely first;
    score = 1 - the out-of-fold probability of the given label."""
    from cleanlab.filter import find_label_issues

    ranked = find_label_issues(f.y, proba, return_indices_ranked_by="self_confidence", n_jobs=1)
    return [{"path": f.paths[i], "given": f.classes[f.y[i]], "suggested": f.classes[int(proba[i].argmax())],
             "score": round(1.0 - float(proba[i, f.y[i]]), 4)} for i in ranked]


def _fold_accuracy(proba: np.ndarray, y: np.ndarray, folds: list) -> dict:
    accs = [float((proba[te].argmax(1) == y[te]).mean()) for _, te in folds]
    return {"mean": round(float(np.mean(accs)), 4), "std": round(float(np.std(accs)), 4)}


def _ungrouped(f: Features, k: int, head: HeadConfig) -> dict:
    """Every file its own group, identical bytes included: what a plain stratified K-fold reports."""
    proba = out_of_fold_proba(f.X, f.y, f.classes, k, head, None)
    return _fold_accuracy(proba, f.y, kfold(f.y, k, head.seed, None))
