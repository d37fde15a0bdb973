"""`featpipe evaluate MODEL DATA_DIR`: score a bundle on a labelled folder the model never chose anything on.

Accuracy (and top-5 past five classes), per-class precision / recall / F1 / support with macro and weighted means
(sklearn.metrics), the confusion matrix (JSON + PNG) and the images the model got wrong most confidently."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from featpipe import bundle as B
from featpipe.dataset import describe
from featpipe.errors import UserError
from featpipe.manifest import labelled_files
from featpipe.predict import cached_or_not, check_weights_apply, gathered


@dataclass(frozen=True)
class EvaluateConfig:
    model: Path
    data_dir: Path | None
    out: Path | None = None  # evaluation.json, confusion.json, confusion.png (default: none written)
    device: str = "auto"
    weights: Path | None = None
    cache_dir: Path = Path("cache")  # head-only bundles: the embedding cache extract uses (as predict)
    worst: int = 20  # most confidently wrong images listed
    labels: Path | None = None  # a CSV/Parquet of paths and labels; with a split column, its test rows are scored


def evaluate(cfg: EvaluateConfig, progress: Callable[[int, int], None] | None = None) -> dict:
    if cfg.worst < 0:
        raise UserError(f"--worst must be at least 0 (got {cfg.worst})")
    bundle = B.load(cfg.model)
    check_weights_apply(bundle, cfg.weights)
    root, files, classes, unusable = _labelled(cfg)
    unknown = sorted(set(classes) - set(bundle.classes))
    if unknown:
        raise UserError(f"{len(unknown)} class(es) of {cfg.labels or root} are not classes of model {bundle.path}: "
                        f"{', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''} (it knows "
                        f"{', '.join(bundle.classes[:10])}{' …' if len(bundle.classes) > 10 else ''})")
    label = {f.path: f.label for f in files}
    batches = cached_or_not(bundle, [f.path for f in files], cfg.cache_dir, cfg.device, cfg.weights, progress)
    proba, ok, skipped = gathered(batches, len(bundle.classes))
    if not ok:
        raise UserError(f"no image of {root} could be decoded ({len(skipped)} skipped)")
    y = np.array([bundle.classes.index(label[str(p)]) for p in ok])
    report = {"model": str(bundle.path), "data_dir": describe(cfg.data_dir), "images": len(ok),
              "skipped": sorted(skipped + unusable, key=lambda s: s["path"]), "classes": bundle.classes,
              **scores(y, proba, bundle.classes),
              "most_confidently_wrong": confidently_wrong(y, proba, ok, bundle.classes, cfg.worst)}
    if cfg.out is not None:
        report["files"] = write(report, Path(cfg.out))
    return report


def _labelled(cfg: EvaluateConfig) -> tuple[Path, list, list[str], list[dict]]:
    """The images to score: class folders, the rows of --labels, or only its test rows when it has a split column
    (the others trained or chose the model); and the rows of --labels skipped."""
    root, listed = labelled_files(cfg.data_dir, cfg.labels)
    files, classes = listed.files, listed.classes
    if listed.splits:
        files = [f for f in files if listed.splits[f.path] == "test"]
        if not files:
            raise UserError(f"the split column of {cfg.labels} has no test rows to evaluate on")
        classes = sorted({f.label for f in files})
    return root, files, classes, listed.skipped_rows()


def scores(y: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score

    labels = list(range(len(classes)))
    pred = proba.argmax(1)
    out = {"accuracy": round(float((pred == y).mean()), 6)}
    if len(classes) > 5:
        out["top5_accuracy"] = round(float(top_k_accuracy_score(y, proba, k=5, labels=labels)), 6)
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    out["per_class"] = {c: {"precision": round(float(p[i]), 6), "recall": round(float(r[i]), 6),
                            "f1": round(float(f[i]), 6), "support": int(s[i])} for i, c in enumerate(classes)}
    for avg in ("macro", "weighted"):
        pa, ra, fa, _ = precision_recall_fscore_support(y, pred, labels=labels, average=avg, zero_division=0)
        out[avg] = {"precision": round(float(pa), 6), "recall": round(float(ra), 6), "f1": round(float(fa), 6)}
    out["confusion"] = confusion_matrix(y, pred, labels=labels).tolist()
    return out


def confidently_wrong(y: np.ndarray, proba: np.ndarray, paths: list[Path], classes: list[str], n: int) -> list:
    pred = proba.argmax(1)
    wrong = np.flatnonzero(pred != y)
    order = wrong[np.argsort(-proba[wrong, pred[wrong]], kind="stable")][:n]
    return [{"path": str(paths[i]), "label": classes[y[i]], "predicted": classes[pred[i]],
             "probability": round(float(proba[i, pred[i]]), 6)} for i in order]


def write(report: dict, out: Path) -> dict:
    from featpipe.report import plot_confusion

    out.mkdir(parents=True, exist_ok=True)
    files = {name: str(out / name) for name in ("evaluation.json", "confusion.json", "confusion.png")}
    (out / "confusion.json").write_text(json.dumps({"classes": report["classes"], "confusion": report["confusion"]}))
    plot_confusion(report["confusion"], report["classes"], f"{Path(report['model']).name} on "
                   f"{report['data_dir']}: accuracy {report['accuracy']:.3f}", out / "confusion.png")
    (out / "evaluation.json").write_text(json.dumps({**report, "files": files}, indent=1))
    return files
