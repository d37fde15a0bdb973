"""Choosing the logistic head's C: inner CV on small training sets, a hold-out and few fits on large ones.

Up to `HeadConfig.holdout_rows` training rows, every C of the grid is scored by stratified inner K-fold CV, each
fold's path warm-started from strong to weak regularisation: the procedure that matched a careful plain script.
Above it that is 55 fits of nearly the whole set (minutes at 50 k rows: bench/README.md), so C is chosen as
DINOv2's and Kornblith et al.'s probes do, on a stratified hold-out (10 %): the grid's decades as one warm-started
path, stopped once a decade is both less accurate than the best and a worse fit than the one before (weak
regularisation costs the most steps), then the half-decade between the best and its better neighbour: 3-7 fits of
90 % of the rows. The final fit warm-starts from the hold-out fit at the chosen C. Either way, ties on accuracy go
to the lowest held-out log-loss.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from featpipe import logreg
from featpipe.splits import Groups, kfold, val_split


@dataclass
class Search:
    C: float
    accuracy: float | None  # held-out accuracy at C (inner-CV mean or hold-out); None: C fixed, nothing scored
    report: dict  # fit-head's `c_search`
    init: logreg.LogReg | None = None  # a fit at C on most of the rows: where the final fit starts


def choose_C(rows: logreg.Rows, y: np.ndarray, Cs: tuple[float, ...], folds: int, seed: int, groups: np.ndarray,
             holdout_rows: int, holdout_fraction: float, threads: int = 1) -> Search:
    t0 = time.perf_counter()
    if len(Cs) == 1:
        search = Search(Cs[0], None, {"method": "fixed"})
    elif len(rows) > holdout_rows:
        search = _holdout(rows, y, Cs, seed, groups, holdout_fraction, threads)
    else:
        search = _inner_cv(rows, y, Cs, folds, seed, groups, threads)
    search.report |= {"chosen": search.C, "search_seconds": round(time.perf_counter() - t0, 3)}
    return search


def _inner_cv(rows, y, Cs, folds, seed, groups, threads) -> Search:
    """Every C on K folds (fewer when the smallest class has fewer distinct images; below 2, C = 1, unscored).
    Mid-path fits stop at 200 steps: they only need to rank C. Each fold's rows are copied (at most 10,000)."""
    per_class = Groups.of(y, groups).per_class(int(y.max()) + 1)
    folds = min(folds, int(per_class[np.unique(y)].min()))
    if folds < 2:
        return Search(1.0, None, {"method": "fixed", "why": "a class has fewer than 2 distinct images"})

    def path(fold) -> np.ndarray:  # (accuracy, log-loss) per C on this fold
        tr, te = fold
        model, fit_rows, held = None, rows.subset(tr).materialised(), rows.subset(te).materialised()
        scores = []
        for C in Cs:
            model = logreg.fit(fit_rows, y[tr], C, init=model, max_iter=200)
            scores.append(model.evaluate(held, y[te]))
        return np.array(scores)

    with ThreadPoolExecutor(threads) as pool:  # whole folds per thread: no fine-grained synchronisation
        acc, loss = sum(pool.map(path, kfold(y, folds, seed, groups))).T / folds
    best = _best(acc, loss)
    return Search(Cs[best], float(acc[best]), _tried("inner-cv", Cs, acc, loss) | {"folds": folds})


def _holdout(rows, y, Cs, seed, groups, fraction, threads) -> Search:
    split = val_split(y, [str(c) for c in range(int(y.max()) + 1)], fraction, seed, groups=groups,
                      small_in_train=True)
    fit_rows, held = rows.subset(split.train), rows.subset(split.val)
    models: dict[int, logreg.LogReg] = {}
    steps: list[int] = []

    def score(i: int, init) -> tuple[float, float]:
        models[i] = logreg.fit(fit_rows, y[split.train], Cs[i], init=init, max_iter=200, threads=threads)
        steps.append(models[i].steps)
        return models[i].evaluate(held, y[split.val])

    scores: dict[int, tuple[float, float]] = {}
    for i in range(0, len(Cs), 2):  # a path: each fit starts from the previous C's
        scores[i] = score(i, models.get(i - 2))
        best_acc = max(a for a, _ in scores.values())
        if i and scores[i][0] < best_acc and scores[i][1] > scores[i - 2][1]:
            break  # past the optimum: less accurate and a worse fit than the last C; weaker C only cost more steps
    coarse = sorted(scores)
    top = coarse[_best(*(np.array([scores[i][j] for i in coarse]) for j in (0, 1)))]
    side = [i for i in (top - 2, top + 2) if i in scores]  # the optimum lies towards the better neighbour
    toward = max(side, key=lambda i: (scores[i][0], -scores[i][1])) if side else top
    if toward != top:
        mid = (top + toward) // 2
        scores[mid] = score(mid, models[top])
    tried = sorted(scores)
    acc, loss = (np.array([scores[i][j] for i in tried]) for j in (0, 1))
    best = tried[_best(acc, loss)]
    report = _tried("holdout", [Cs[i] for i in tried], acc, loss) | {"holdout_rows": int(len(split.val)),
                                                                     "steps": steps}
    return Search(Cs[best], float(scores[best][0]), report, init=models[best])


def _best(acc: np.ndarray, loss: np.ndarray) -> int:
    """Highest accuracy; ties to the lowest log-loss (on small separable sets many C tie, and the most regularised
    of them answers right with near-uniform probabilities)."""
    tied = np.flatnonzero(acc >= acc.max() - 1e-9)
    return int(tied[np.argmin(loss[tied])])


def _tried(method: str, Cs, acc, loss) -> dict:
    return {"method": method, "values": [float(c) for c in Cs], "accuracy": [round(float(a), 4) for a in acc],
            "log_loss": [round(float(v), 4) for v in loss]}
