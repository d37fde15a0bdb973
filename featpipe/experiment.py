"""The experiment: scratch vs frozen-backbone head vs fine-tuned last blocks, per backbone, on one shared split.

Per backbone the images are extracted once (cached embeddings for the head and the fine-tune warm start), timed
apart from training; fine-tune and scratch decode their batches as they train (train_images), inside their time.
Every row's model is saved as a bundle `featpipe predict` loads (cfg.out/models/<backbone>-<method or head kind>).
Every pretrained backbone's weights are checked before any work, so a config naming an unavailable one stops at
once instead of after an hour of the others. `--backbones auto` runs every backbone whose weights are here and adds
one head row on the feature set fit-head's `--backbone auto` would choose (feature_sets.py), on the same split.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from featpipe import __version__, feature_sets
from featpipe.experiment_config import METHODS, ExperimentConfig, plan
from featpipe.errors import UserError
from featpipe.extract import ExtractConfig
from featpipe.splits import Groups
from featpipe.train import finetune, scratch
from featpipe.held_out import arrange, check_folders
from featpipe.train_images import scan_images, split_images

TUTORIAL_MIN_VAL = 0.80
TUTORIAL_MAX_SECONDS = 30 * 60


def run(cfg: ExperimentConfig, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Run every method x backbone; write report.json, report.md, report.png and confusion.png under cfg.out, and
    each row's model bundle under cfg.out/models (the report links to them)."""
    from featpipe.dataset import scan
    from featpipe.runtime import prepare

    t_start = time.perf_counter()
    specs, auto_parts = plan(cfg)
    _check_models(cfg)
    if cfg.labels is None:
        scan(cfg.data_dir)  # a bad DATA_DIR fails now, not after the first backbone's work
    check_folders(ExtractConfig(data_dir=cfg.data_dir, labels=cfg.labels), cfg.val_dir, cfg.test_dir)
    device = str(prepare(cfg.device)[0])
    results, backbones, preds = [], {}, {}  # preds: (method, backbone) -> (val labels, predicted)
    for spec in specs:
        info, rows = run_backbone(cfg, spec, log)
        backbones[spec.name] = info
        for r, pred in rows:
            results.append(r)
            preds[(r["method"], r["backbone"])] = info["y_val"], pred
    if auto_parts:
        log(f"== head / {feature_sets.AUTO}")
        held = held_out(cfg, ",".join(auto_parts))
        r, pred = run_head(cfg, held, auto=True)
        results.append(r)
        preds[("head", feature_sets.AUTO)] = held.features.y[held.split.val], pred
    for r in results:
        r["meets_tutorial_task"] = bool(r["val_accuracy"] >= TUTORIAL_MIN_VAL and r["train_seconds"] <
                                        TUTORIAL_MAX_SECONDS and r["only_last_layers_trained"])
    by_key = {(r["method"], r["backbone"]): r for r in results}
    best = max(results, key=lambda r: (r["val_accuracy"], -r["train_seconds"]))
    first = next(iter(backbones.values()))
    y_val = first["y_val"]
    report = {
        "results": results, "device": device, "featpipe_version": __version__, "backbones": {
            k: {kk: vv for kk, vv in v.items() if kk != "y_val"} for k, v in backbones.items()},
        "dataset": {"classes": first["classes"], "images_per_class": first["images_per_class"],
                    "n_train": first["n_train"], "n_val": first["n_val"], "validation": first["validation"],
                    "majority_val_accuracy": round(float(np.bincount(y_val).max() / len(y_val)), 4)},
        "timings": {"one_time": {k: {"extract_seconds": v["extract_seconds"], "prepare_seconds": v["prepare_seconds"]}
                                 for k, v in backbones.items()},
                    "training": {f"{r['method']}/{r['backbone']}": r["train_seconds"] for r in results},
                    "total_seconds": None},
        "best": {"method": best["method"], "backbone": best["backbone"], "val_accuracy": best["val_accuracy"],
                 "model_path": best["model_path"],
                 "confusion": confusion(*preds[(best["method"], best["backbone"])], len(first["classes"]))},
        "config": cfg.resolved(),
    }
    for r in results:
        scratch_r = by_key.get(("scratch", r["backbone"]))
        r["speedup_vs_scratch"] = round(scratch_r["train_seconds"] / r["train_seconds"], 2) if scratch_r and \
            r["train_seconds"] > 0 else None
    report["timings"]["total_seconds"] = round(time.perf_counter() - t_start, 2)
    from featpipe.report import write

    return write(report, cfg.out)


def run_backbone(cfg: ExperimentConfig, spec, log) -> tuple[dict, list[tuple[dict, np.ndarray]]]:
    """One backbone: extract (if a pretrained method runs; else list and check the files), then each method."""
    held, extract_seconds = None, 0.0
    if {"head", "finetune"} & set(cfg.methods) or cfg.val_dir or cfg.test_dir or cfg.labels:
        t0 = time.perf_counter()
        held = held_out(cfg, spec.name)
        extract_seconds = time.perf_counter() - t0
        f = held.features
        images = split_images(f.paths, f.y, f.classes, f.sha256, f.groups, spec.preprocessing, cfg.val_fraction,
                              cfg.seed, given=(held.split, held.validation))
    else:
        images = scan_images(cfg.data_dir, spec.name, cfg.val_fraction, cfg.seed)
    classes, y, split = images.classes, images.y, images.split
    rows = []
    for method in [m for m in METHODS if m in cfg.methods]:
        log(f"== {method} / {spec.name}")
        if method == "head":
            rows.append(run_head(cfg, held))
            continue
        tc = cfg.train_config(method, spec.name)
        if method == "finetune":
            res = finetune(tc, held, log=log, images=images)
        else:
            res = scratch(tc, log=log, images=images, held=held)
        rows.append((res.to_json() | {"only_last_layers_trained": method == "finetune"}, res.val_pred))
    key = held.features.result.cache.key if held is not None else None
    info = {"weights_sha256": key.weights_sha256 if key else "random-init",
            "preprocessing": json.loads(spec.preprocessing.to_json()),
            "extract_seconds": round(extract_seconds, 2),
            "prepare_seconds": images.prepare_seconds,
            "classes": classes, "images_per_class": {c: int((y == i).sum()) for i, c in enumerate(classes)},
            "n_train": int(len(split.train)), "n_val": int(len(split.val)), "y_val": y[split.val],
            "validation": images.validation}
    return info, rows


def held_out(cfg: ExperimentConfig, backbone: str):
    """Extract what the cache lacks (`backbone`: one name, or parts joined by commas) and hold out the shared
    validation rows: rows are in path order, so every backbone gets the same split."""
    from featpipe.features import load_features

    extract = ExtractConfig(data_dir=cfg.data_dir, backbone=backbone, cache_dir=cfg.cache_dir, device=cfg.device,
                            labels=cfg.labels)
    return arrange(load_features(extract), extract, cfg.val_dir, cfg.test_dir, cfg.val_fraction, cfg.seed,
                   val_needed=True)


def run_head(cfg: ExperimentConfig, held, auto: bool = False) -> tuple[dict, np.ndarray]:
    """Fit the head on the training split's cached features (timed), score it, K-fold CV it on every image, and
    save it as fit-head would. `auto`: held has every part side by side; the head is on the set chosen by inner CV
    (the CV redoes the choice per fold), and the row says what was tried."""
    from featpipe.fit_head import fit_and_score
    from featpipe.heads import HeadConfig, accuracy

    f, split, test = held.features, held.split, held.test
    hc = HeadConfig(kind=cfg.head, seed=cfg.seed)
    k = min(cfg.cv, int(Groups.of(f.y, f.groups).per_class(len(f.classes)).min()))
    extract_seconds = f.extract_seconds()
    head, s, choice = fit_and_score(f, split, hc, k if k >= 2 else None, auto)
    if choice is not None:
        f, test = f.narrowed(choice.parts), None if test is None else test.narrowed(choice.parts)
    pred = head.predict_proba(f.X[split.val]).argmax(1)
    r = {"method": "head", "backbone": feature_sets.AUTO if auto else f.result.backbone,
         "train_accuracy": s["train_accuracy"], "val_accuracy": s["val_accuracy"],
         "train_seconds": round(s["fit_seconds"], 3), "cv_accuracy_mean": s["cv_accuracy_mean"],
         "cv_accuracy_std": s["cv_accuracy_std"],
         "cv_folds": k if k >= 2 else None, "history": [], "hyperparameters": {"head": hc.kind, **head.params},
         "n_train": int(len(split.train)), "n_val": int(len(split.val)), "only_last_layers_trained": True,
         "validation": held.validation}
    if choice is not None:  # what each part's extraction took this run (scan only, once cached), as fit-head reports it
        r |= {"feature_sets": feature_sets.summary(choice), "extract_seconds": extract_seconds}
    if test is not None:
        r |= held.test_report(accuracy(head, test.X, test.y, np.arange(len(test.y))))
    r["model_path"] = str(save_head(cfg, f, head, r, r["backbone"]))
    return r, pred


def _check_models(cfg: ExperimentConfig) -> None:
    """Bundles of another data dir under the report dir would be replaced, or left beside this run's: refuse."""
    from featpipe.bundle import trained_on
    from featpipe.dataset import describe

    here = describe(cfg.data_dir)
    for d in sorted((Path(cfg.out) / "models").glob("*")):
        if (old := trained_on(d)) and old != here:
            raise UserError(f"{cfg.out} holds models trained on {old}, not {here}: pass another --out, or delete "
                            f"{Path(cfg.out) / 'models'}")


def save_head(cfg: ExperimentConfig, f, head, r: dict, name: str) -> Path:
    """A head bundle exactly like fit-head's, under the report dir (models/<name>-<head>)."""
    from featpipe.bundle import save
    from featpipe.fit_head import head_bundle

    metrics = {k: r[k] for k in ("train_accuracy", "val_accuracy", "cv_accuracy_mean", "cv_accuracy_std", "n_train",
                                 "n_val", "cv_folds")}
    metrics |= {"fit_seconds": r["train_seconds"], "duplicate_files": f.duplicates.files,
                "val_fraction": cfg.val_fraction, "seed": cfg.seed}
    return save(head_bundle(f, head, metrics), cfg.out / "models" / f"{name}-{head.kind}")


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> list[list[int]]:
    m = np.zeros((n, n), dtype=int)
    np.add.at(m, (y_true, y_pred), 1)
    return m.tolist()
