"""Light heads on cached embeddings: `logistic` (unit-normalised, standardised multinomial logistic regression, C chosen
by featpipe.c_search) and `mlp`.

Every head ends as plain arrays: a standardiser (mean, scale) and one or two Linear layers. That one form serves
`predict_proba`, the safetensors bundle, and `as_torch_module()` (embeddings -> logits, the standardiser folded
into the first Linear) which fine-tuning warm-starts from. The fits read X in place (featpipe.logreg.Rows): a
million cached rows are held once, whatever the folds.
"""

from __future__ import annotations

import importlib
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np
from array_api_compat import array_namespace
from threadpoolctl import threadpool_limits

from featpipe import logreg
from featpipe.c_search import choose_C
from featpipe.errors import UserError
from featpipe.splits import Groups, check_folds, kfold, val_split

KINDS = ("logistic", "mlp")


@dataclass(frozen=True)
class HeadConfig:
    kind: str = "logistic"
    seed: int = 0
    # logistic: C grid swept from strong to weak regularisation, warm-starting each fit from the previous one
    Cs: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 1, 11))
    inner_folds: int = 5  # fewer when the smallest class is smaller (down to 2; below that C = 1, no sweep)
    holdout_rows: int = 10_000  # above this many training rows: C chosen on a hold-out with few fits (c_search.py)
    holdout_fraction: float = 0.1
    dtype: str = "float32"  # the solvers' working precision; "float64" for a reference fit
    device: str = "cpu"  # auto | cpu | cuda: where a large fit (more than holdout_rows) runs its products
    # mlp
    hidden: int = 256
    dropout: float = 0.3
    lr: float = 1e-3
    weight_decay: float = 1e-3
    max_epochs: int = 300
    patience: int = 30
    batch_size: int = 2048  # at 50 k rows fewer, less noisy steps scored better than 512 (bench/README.md)
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
    report: dict = field(default_factory=dict, compare=False)  # how the fit went (c_search): --json, not the bundle

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
def one_thread(torch_threads: int | None = None):
    """BLAS (numpy, scipy) at one thread for the duration (the logistic solver makes its own), and torch's
    intra-op threads at `torch_threads` (the MLP head; restored after). Only the MLP loads torch."""
    torch = importlib.import_module("torch") if torch_threads else None
    before = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(torch_threads)
    try:
        with threadpool_limits(1):
            yield
    finally:
        if torch:
            torch.set_num_threads(before)


def fit_head(X: np.ndarray, y: np.ndarray, n_classes: int, cfg: HeadConfig, groups: np.ndarray | None = None,
             rows: np.ndarray | None = None) -> Head:
    """Fit on the rows `rows` of X (default all; y and groups are per row of X). X is never copied: the solvers read
    it through featpipe.logreg.Rows. `groups` (featpipe.splits): C's folds or hold-out and the MLP's
    early-stopping split keep copies together."""
    rows = np.arange(len(X)) if rows is None else np.sort(rows)  # a set: its order must not change the fit
    g = np.arange(len(X)) if groups is None else np.asarray(groups)
    small, cores = len(rows) <= cfg.holdout_rows, len(os.sched_getaffinity(0))
    # One fit of a few thousand rows gains nothing from more threads (they only synchronise); independent fits
    # (inner-CV folds) and large fits (shares of the rows) use every core.
    with one_thread(torch_threads=None if cfg.kind == "logistic" else 1 if small else cores):
        design = standardised(_on_device(X, cfg, small), rows, cfg.dtype)
        if cfg.kind == "logistic":
            return _fit_logistic(design, y[rows], n_classes, cfg, g[rows], cores, 1 if small else cores)
        return _fit_mlp(design, y[rows], n_classes, cfg, g[rows])


def standardised(X, rows: np.ndarray, dtype: str = "float32") -> logreg.Rows:
    """Unit-normalised rows of X, standardised by their mean and std over `rows` (StandardScaler's rule: a
    constant feature gets scale 1), as a Rows view: two passes over X, no copy of it."""
    raw, xp = logreg.Rows.of(X, dtype), array_namespace(X)
    norm = np.empty(len(X), np.float32)
    for ch in raw.chunks():
        norm[ch.pos] = 1.0 / np.maximum(np.sqrt(logreg.host(xp.sum(ch.X * ch.X, axis=1))), 1e-12)
    s1, s2 = np.zeros(raw.dim), np.zeros(raw.dim)
    for ch in replace(raw, norm=norm, dtype="float64").subset(rows).chunks():  # sums without cancellation
        Zc = ch.X * ch.norm[:, None]
        s1, s2 = s1 + logreg.host(xp.sum(Zc, axis=0)), s2 + logreg.host(xp.sum(Zc * Zc, axis=0))
    mean = s1 / len(rows)
    std = np.sqrt(np.maximum(s2 / len(rows) - mean * mean, 0.0))
    scale = np.where(std > np.maximum(1e-6 * np.abs(mean), 1e-12), std, 1.0)  # a constant's std is rounding
    return replace(raw, idx=rows, norm=norm, mean=mean.astype(np.float32), scale=scale.astype(np.float32))


def _on_device(X: np.ndarray, cfg: HeadConfig, small: bool):
    """X where the solver runs: as it is for the CPU, one copy in GPU memory for a large fit on CUDA."""
    if small or cfg.device == "cpu":
        return X
    import torch  # only a large fit that may use the GPU pays for torch's import

    from featpipe.embed import resolve_device

    device = resolve_device(cfg.device)  # --device cuda without a GPU: one line, as extract says it
    return X if device.type == "cpu" else torch.as_tensor(X).to(device)


def accuracy(head: Head, X: np.ndarray, y: np.ndarray, rows: np.ndarray | None = None) -> float | None:
    """On rows `rows` of X (default all), 65,536 at a time: a large X is not copied whole."""
    rows = np.arange(len(y)) if rows is None else rows
    if not len(rows):
        return None
    chunks = (rows[s:s + 65536] for s in range(0, len(rows), 65536))
    return sum(int((head.predict_proba(X[c]).argmax(1) == y[c]).sum()) for c in chunks) / len(rows)


def cross_validate(X: np.ndarray, y: np.ndarray, classes: list[str], k: int, cfg: HeadConfig,
                   groups: np.ndarray | None = None) -> tuple[float, float]:
    """Mean and (population) std of held-out accuracy over stratified K folds of (X, y), refitting the whole head
    procedure (standardiser, C search, or MLP early stopping) on each fold's training rows (X read, never copied)."""
    accs = [accuracy(head, X, y, te) for head, te in fold_heads(X, y, classes, k, cfg, groups)]
    return float(np.mean(accs)), float(np.std(accs))


def out_of_fold_proba(X: np.ndarray, y: np.ndarray, classes: list[str], k: int, cfg: HeadConfig,
                      groups: np.ndarray | None = None) -> np.ndarray:
    """float32 (N, classes): each row's probabilities from the head of the fold that did not train on it."""
    proba = np.empty((len(y), len(classes)), np.float32)
    for head, te in fold_heads(X, y, classes, k, cfg, groups):
        proba[te] = head.predict_proba(X[te])
    return proba


def fold_heads(X: np.ndarray, y: np.ndarray, classes: list[str], k: int, cfg: HeadConfig,
               groups: np.ndarray | None = None) -> Iterator[tuple[Head, np.ndarray]]:
    """(head fitted on the other folds, this fold's rows) per stratified group K-fold (groups: one fold each)."""
    check_folds(y, classes, k, groups=groups)
    g = np.arange(len(y)) if groups is None else groups
    for tr, te in kfold(y, k, cfg.seed, g):
        yield fit_head(X, y, len(classes), cfg, g, rows=tr), te


# ---- logistic ------------------------------------------------------------------------------------------------

def _fit_logistic(rows: logreg.Rows, y: np.ndarray, n_classes: int, cfg: HeadConfig, groups, search_threads: int,
                  fit_threads: int) -> Head:
    search = choose_C(rows, y, cfg.Cs, cfg.inner_folds, cfg.seed, groups, cfg.holdout_rows, cfg.holdout_fraction,
                      search_threads)
    t0 = time.perf_counter()
    model = logreg.fit(rows, y, search.C, init=search.init, max_iter=1000, threads=fit_threads)
    report = search.report | {"refit_seconds": round(time.perf_counter() - t0, 3), "refit_steps": model.steps,
                              "refit_converged": model.converged}
    w, b = _full_rows(model, n_classes)
    return Head("logistic", {"mean": rows.mean, "scale": rows.scale, "w1": w, "b1": b},
                {"C": search.C, "inner_cv_accuracy": search.accuracy if report["method"] == "inner-cv" else None},
                {"c_search": report})


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

def _fit_mlp(rows: logreg.Rows, y: np.ndarray, n_classes: int, cfg: HeadConfig, groups) -> Head:
    """One hidden layer + dropout, AdamW on minibatches; early stopping on an inner stratified split (best-loss
    weights kept). Classes too small for an inner split: a fixed budget, no early stopping."""
    from featpipe.head_module import fit_mlp  # torch: loaded for the MLP head only

    tr, va = _inner_split(y, cfg, groups)
    layers, epochs = fit_mlp(rows.dense, y, tr, va, n_classes, cfg)
    return Head("mlp", {"mean": rows.mean, "scale": rows.scale, **layers},
                {"hidden": cfg.hidden, "dropout": cfg.dropout, "epochs": epochs})


def _inner_split(y: np.ndarray, cfg: HeadConfig, groups) -> tuple[np.ndarray, np.ndarray]:
    counts = Groups.of(y, groups).per_class(int(y.max()) + 1)
    if counts[counts > 0].min() < 2:
        return np.arange(len(y)), np.array([], dtype=np.int64)
    split = val_split(y, [str(c) for c in range(len(counts))], cfg.inner_val_fraction, cfg.seed, groups=groups)
    return split.train, split.val
