"""Light heads on cached embeddings: `logistic` (unit-normalised, standardised multinomial logistic regression, C chosen
by CV) and `mlp`.

Every head ends as plain arrays: a standardiser (mean, scale) and one or two Linear layers. That one form serves
`predict_proba`, the safetensors bundle, and `as_torch_module()` (embeddings -> logits, the standardiser folded
into the first Linear) which fine-tuning warm-starts from. Fits are pinned to one thread: on a few hundred rows,
more BLAS/torch threads only add synchronisation, and collapse when the other cores are busy.
"""

from __future__ import annotations

import importlib
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from threadpoolctl import threadpool_limits

from featpipe import logreg
from featpipe.errors import UserError
from featpipe.splits import Groups, check_folds, check_fraction, check_k, kfold, val_split

if TYPE_CHECKING:
    from featpipe.extract import ExtractConfig

KINDS = ("logistic", "mlp")


@dataclass(frozen=True)
class HeadConfig:
    kind: str = "logistic"
    seed: int = 0
    # logistic: C grid swept from strong to weak regularisation, warm-starting each fit from the previous one
    Cs: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 1, 11))
    inner_folds: int = 5  # fewer when the smallest class is smaller (down to 2; below that C = 1, no sweep)
    # mlp
    hidden: int = 256
    dropout: float = 0.3
    lr: float = 1e-3
    weight_decay: float = 1e-3
    max_epochs: int = 300
    patience: int = 30
    inner_val_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"--head must be one of {', '.join(KINDS)} (got {self.kind!r})")


@dataclass
class Head:
    """A fitted head: kind, arrays (float32: mean, scale, w1, b1[, w2, b2]), and JSON-able fit details."""

    kind: str
    arrays: dict[str, np.ndarray]
    params: dict = field(default_factory=dict)

    def as_torch_module(self):
        """The head as a torch module (featpipe.head_module.to_module): what fine-tuning trains."""
        from featpipe.head_module import to_module

        return to_module(self.kind, self.arrays, self.params.get("dropout", 0.0), self.params.get("unit_norm", True))

    @classmethod
    def from_torch_module(cls, module, params: dict) -> "Head":
        """as_torch_module()'s inverse after fine-tuning changed the layers."""
        from featpipe.head_module import from_module

        kind, arrays, dropout, unit_norm = from_module(module)
        return cls(kind, arrays, params | ({"dropout": dropout} if dropout is not None else {})
                   | ({} if unit_norm else {"unit_norm": False}))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """What as_torch_module() computes, in numpy: predicting needs no torch."""
        a = self.arrays
        with threadpool_limits(1):
            X = np.asarray(X, np.float32)
            X = unit_norm(X) if self.params.get("unit_norm", True) else X
            h = ((X - a["mean"]) / a["scale"]) @ a["w1"].T + a["b1"]
            if self.kind == "mlp":
                h = np.maximum(h, 0) @ a["w2"].T + a["b2"]
        return logreg.softmax(h)


def unit_norm(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


@contextmanager
def one_thread(torch_too: bool = False):
    """BLAS (numpy, scipy) and, with `torch_too` (the MLP head), torch's intra-op threads at one for the
    duration; torch's setting restored after. Only the MLP loads torch."""
    torch = importlib.import_module("torch") if torch_too else None
    before = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        if torch:
            torch.set_num_threads(before)


def fit_head(X: np.ndarray, y: np.ndarray, n_classes: int, cfg: HeadConfig, groups: np.ndarray | None = None) -> Head:
    """`groups` (featpipe.splits): the inner C folds and the MLP's early-stopping split keep copies together."""
    with one_thread(torch_too=cfg.kind == "mlp"):
        return (_fit_logistic if cfg.kind == "logistic" else _fit_mlp)(unit_norm(X), y, n_classes, cfg, groups)


def accuracy(head: Head, X: np.ndarray, y: np.ndarray) -> float | None:
    return float((head.predict_proba(X).argmax(1) == y).mean()) if len(y) else None


def cross_validate(X: np.ndarray, y: np.ndarray, classes: list[str], k: int, cfg: HeadConfig,
                   groups: np.ndarray | None = None) -> tuple[float, float]:
    """Mean and (population) std of held-out accuracy over stratified K folds of (X, y), refitting the whole head
    procedure (standardiser, C sweep with its own inner CV, or MLP early stopping) on each fold's training part."""
    check_folds(y, classes, k, groups=groups)
    g = np.arange(len(y)) if groups is None else groups
    accs = [accuracy(fit_head(X[tr], y[tr], len(classes), cfg, g[tr]), X[te], y[te])
            for tr, te in kfold(y, k, cfg.seed, g)]
    return float(np.mean(accs)), float(np.std(accs))


# ---- logistic ------------------------------------------------------------------------------------------------

def _fit_logistic(X: np.ndarray, y: np.ndarray, n_classes: int, cfg: HeadConfig, groups) -> Head:
    mean, scale = _standardiser(X)
    Z = (X - mean) / scale
    C, cv_acc = _choose_C(Z, y, cfg, groups)
    w, b = _full_rows(logreg.fit(Z, y, C, max_iter=1000), n_classes)
    return Head("logistic", {"mean": mean, "scale": scale, "w1": w, "b1": b},
                {"C": C, "inner_cv_accuracy": cv_acc})


def _standardiser(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """StandardScaler's rule: constant features get scale 1 (so they pass through instead of dividing by zero)."""
    mean, std = X.mean(0), X.std(0)
    return mean.astype(np.float32), np.where(std > 1e-12, std, 1.0).astype(np.float32)


def _choose_C(Z: np.ndarray, y: np.ndarray, cfg: HeadConfig, groups=None) -> tuple[float, float | None]:
    """Highest mean inner-CV accuracy over the grid; ties go to the lowest held-out log-loss.

    On small separable sets many C tie on accuracy; the smallest of them (the old rule) gave near-uniform
    probabilities (top class 0.21-0.26 of 5) while a C a few steps up was just as accurate and confident.
    Each fold's path is warm-started; mid-path fits stop at 200 iterations: they only need to rank C."""
    per_class = Groups.of(y, groups).per_class(int(y.max()) + 1)
    folds = min(cfg.inner_folds, int(per_class[np.unique(y)].min()))
    if folds < 2 or len(cfg.Cs) == 1:
        return (cfg.Cs[0] if len(cfg.Cs) == 1 else 1.0), None
    acc, loss = np.zeros(len(cfg.Cs)), np.zeros(len(cfg.Cs))
    for tr, te in kfold(y, folds, cfg.seed, groups):
        model = None
        for i, C in enumerate(cfg.Cs):
            model = logreg.fit(Z[tr], y[tr], C, init=model, max_iter=200)
            proba = model.predict_proba(Z[te])
            held = proba[np.arange(len(te)), np.searchsorted(model.classes, y[te])]
            acc[i] += (model.classes[proba.argmax(1)] == y[te]).mean() / folds
            loss[i] -= np.log(np.maximum(held, 1e-15)).mean() / folds
    tied = np.flatnonzero(acc >= acc.max() - 1e-9)
    best = int(tied[np.argmin(loss[tied])])
    return cfg.Cs[best], float(acc[best])


def _full_rows(model: logreg.LogReg, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One row per class (all classes, even ones a CV fold lacked); binary -> +-w/2 rows, whose softmax equals
    the sigmoid."""
    coef, icpt = model.coef, model.intercept
    if coef.shape[0] == 1:
        coef, icpt = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-icpt / 2, icpt / 2])
    w = np.zeros((n_classes, coef.shape[1]), np.float32)
    b = np.full(n_classes, -1e4, np.float32)  # a class absent from training is never predicted
    w[model.classes], b[model.classes] = coef, icpt
    return w, b


# ---- mlp -----------------------------------------------------------------------------------------------------

def _fit_mlp(X: np.ndarray, y: np.ndarray, n_classes: int, cfg: HeadConfig, groups) -> Head:
    """One hidden layer + dropout, Adam, full batch; early stopping on an inner stratified split (best-loss
    weights kept). Classes too small for an inner split: fixed max_epochs, no early stopping."""
    from featpipe.head_module import fit_mlp  # torch: loaded for the MLP head only

    mean, scale = _standardiser(X)
    tr, va = _inner_split(y, cfg, groups)
    layers, epochs = fit_mlp((X - mean) / scale, y, tr, va, n_classes, cfg)
    return Head("mlp", {"mean": mean, "scale": scale, **layers},
                {"hidden": cfg.hidden, "dropout": cfg.dropout, "epochs": epochs})


def _inner_split(y: np.ndarray, cfg: HeadConfig, groups) -> tuple[np.ndarray, np.ndarray]:
    counts = Groups.of(y, groups).per_class(int(y.max()) + 1)
    if counts[counts > 0].min() < 2:
        return np.arange(len(y)), np.array([], dtype=np.int64)
    split = val_split(y, [str(c) for c in range(len(counts))], cfg.inner_val_fraction, cfg.seed, groups=groups)
    return split.train, split.val


# ---- the fit-head command ------------------------------------------------------------------------------------

@dataclass
class FitConfig:
    extract: ExtractConfig
    head: HeadConfig
    cv: int | None = None
    val_fraction: float = 0.2
    out: Path | None = None  # default models/<backbone>-<head>
    force: bool = False  # replace a bundle at `out` trained on another data dir

    def __post_init__(self) -> None:  # before extraction: a typo should not cost the whole extract first
        check_fraction(self.val_fraction)
        if self.cv is not None:
            check_k(self.cv)


def fit_and_save(cfg: FitConfig, progress: bool = True) -> dict:
    """Extract what the cache lacks, fit on the training split's cached features, save a bundle; the JSON report.

    fit_seconds times the final fit alone (standardiser + C sweep, or MLP training), not --cv's refits."""
    from featpipe.bundle import output_dir, save
    from featpipe.features import load_features
    from featpipe.registry import resolve

    out = output_dir(cfg.out, f"{resolve(cfg.extract.backbone).name}-{cfg.head.kind}", cfg.extract.data_dir,
                     cfg.force)
    f = load_features(cfg.extract, progress)
    split = val_split(f.y, f.classes, cfg.val_fraction, cfg.head.seed, groups=f.groups)
    if cfg.cv is not None:  # before any fitting: a bad --cv should fail in a second, not after the fit
        check_folds(f.y, f.classes, cfg.cv, groups=f.groups)
    t0 = time.perf_counter()
    head = fit_head(f.X[split.train], f.y[split.train], len(f.classes), cfg.head, f.groups[split.train])
    fit_seconds = time.perf_counter() - t0
    # K-fold over every labelled image (the usual meaning of CV accuracy); separate fits, so the holdout's
    # val_accuracy stays untouched by them.
    cv = cross_validate(f.X, f.y, f.classes, cfg.cv, cfg.head, f.groups) if cfg.cv else (None, None)
    data = f.data()
    report = {"head": head.kind, "backbone": f.result.backbone,
              "train_accuracy": _round(accuracy(head, f.X[split.train], f.y[split.train])),
              "val_accuracy": _round(accuracy(head, f.X[split.val], f.y[split.val])),
              "cv_accuracy_mean": _round(cv[0]), "cv_accuracy_std": _round(cv[1]), "fit_seconds": round(fit_seconds, 4),
              "n_train": int(len(split.train)), "n_val": int(len(split.val)), "classes": f.classes,
              "class_counts": data["class_counts"], "data_dir": data["dir"], **f.duplicates.to_json()}
    metrics = {k: v for k, v in report.items() if k not in ("head", "backbone", "classes", "class_counts", "data_dir",
                                                            "label_conflicts")}
    bundle = head_bundle(f, head, metrics | {"cv_folds": cfg.cv, "val_fraction": cfg.val_fraction,
                                             "seed": cfg.head.seed})
    return report | {"model_path": str(save(bundle, out))}


def head_bundle(f, head: Head, metrics: dict):
    """A head fitted on cached features `f` (featpipe.features.Features) as the bundle fit-head saves."""
    from featpipe.bundle import Bundle

    key = f.result.key
    return Bundle(key.backbone, key.weights_sha256, key.preprocessing, f.classes, head, metrics, data=f.data())


def _round(x: float | None) -> float | None:
    """Accuracies to 4 places, as finetune and scratch report them."""
    return None if x is None else round(x, 4)
