"""Choosing the logistic head's C: inner CV on small training sets, a hold-out on large ones, one search for both.

The search (search_path) walks the grid's decades as one warm-started path from strong to weak regularisation,
stopped once a decade is both less accurate than the best and a worse fit than the one before (weak
regularisation costs the most steps), then tries the half-decade between the best and its better neighbour: at
most 7 of the 11 values. Up to `HeadConfig.holdout_rows` training rows each value is scored by stratified inner
K-fold CV (the folds' mean), its fits stopped at SEARCH_TOL; above, as DINOv2's and Kornblith et al.'s probes do,
on a stratified 10 % hold-out (K folds of 50 k rows would take minutes: bench/README.md), and the final fit
warm-starts from the hold-out fit at the chosen C. Either way, ties on accuracy go to the lowest held-out log-loss.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from featpipe import logreg
from featpipe.splits import Groups, kfold, val_split


SEARCH_TOL = 1e-3  # inner-CV fits only rank C: sklearn's 1e-4 took 3x the steps for the same choice (bench/README)


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
    """C on K inner folds (fewer when the smallest class has fewer distinct images; below 2, C = 1, unscored), the
    folds' mean accuracy and log-loss steering one path (search_path). Mid-path fits stop at 200 steps or
    SEARCH_TOL: they only need to rank C. Every fold's rows are copied once (at most 10,000 rows: K copies stay a
    few hundred MiB)."""
    per_class = Groups.of(y, groups).per_class(int(y.max()) + 1)
    folds = min(folds, int(per_class[np.unique(y)].min()))
    if folds < 2:
        return Search(1.0, None, {"method": "fixed", "why": "a class has fewer than 2 distinct images"})
    data = [(rows.subset(tr).materialised(), y[tr], rows.subset(te).materialised(), y[te])
            for tr, te in kfold(y, folds, seed, groups)]
    models: dict[int, list[logreg.LogReg]] = {}

    def fold(i: int, start: int | None, j: int) -> tuple[logreg.LogReg, tuple[float, float]]:
        fit_rows, y_fit, held, y_held = data[j]
        model = logreg.fit(fit_rows, y_fit, Cs[i], init=models[start][j] if start is not None else None,
                           max_iter=200, tol=SEARCH_TOL)
        return model, model.evaluate(held, y_held)

    with ThreadPoolExecutor(threads) as pool:  # a C's folds side by side: whole fits per thread
        def score(i: int, start: int | None) -> tuple[float, float]:
            out = list(pool.map(lambda j: fold(i, start, j), range(len(data))))
            models[i] = [m for m, _ in out]
            return tuple(np.mean([s for _, s in out], axis=0))

        scores = search_path(score, len(Cs))
    tried, acc, loss, best = _ranked(scores)
    return Search(Cs[best], float(scores[best][0]), _tried("inner-cv", [Cs[i] for i in tried], acc, loss)
                  | {"folds": folds})


def _holdout(rows, y, Cs, seed, groups, fraction, threads) -> Search:
    split = val_split(y, [str(c) for c in range(int(y.max()) + 1)], fraction, seed, groups=groups,
                      small_in_train=True)
    fit_rows, held = rows.subset(split.train), rows.subset(split.val)
    models: dict[int, logreg.LogReg] = {}
    steps: list[int] = []

    def score(i: int, start: int | None) -> tuple[float, float]:
        models[i] = logreg.fit(fit_rows, y[split.train], Cs[i], init=models.get(start), max_iter=200,
                               threads=threads)
        steps.append(models[i].steps)
        return models[i].evaluate(held, y[split.val])

    scores = search_path(score, len(Cs))
    tried, acc, loss, best = _ranked(scores)
    report = _tried("holdout", [Cs[i] for i in tried], acc, loss) | {"holdout_rows": int(len(split.val)),
                                                                     "steps": steps}
    return Search(Cs[best], float(scores[best][0]), report, init=models[best])


def search_path(score: Callable[[int, int | None], tuple[float, float]],
                n: int) -> dict[int, tuple[float, float]]:
    """(accuracy, log-loss) per tried position of the C grid. Its decades (every other C) as one warm-started path
    from strong to weak regularisation, stopped once a decade is both less accurate than the best so far and a
    worse fit than the one before (past the optimum; weak regularisation costs the most steps); then the half-decade
    between the best and its better neighbour. `score(i, start)`: fit C i warm-started from C start's fit."""
    scores: dict[int, tuple[float, float]] = {}
    for i in range(0, n, 2):
        scores[i] = score(i, i - 2 if i else None)
        if i and scores[i][0] < max(a for a, _ in scores.values()) and scores[i][1] > scores[i - 2][1]:
            break
    top = _ranked(scores)[3]
    side = [i for i in (top - 2, top + 2) if i in scores]  # the optimum lies towards the better neighbour
    toward = max(side, key=lambda i: (scores[i][0], -scores[i][1])) if side else top
    if toward != top:
        scores[(top + toward) // 2] = score((top + toward) // 2, top)
    return scores


def _ranked(scores: dict[int, tuple[float, float]]) -> tuple[list[int], np.ndarray, np.ndarray, int]:
    """(grid positions tried, their accuracy, their log-loss, the best position)."""
    tried = sorted(scores)
    acc, loss = (np.array([scores[i][j] for i in tried]) for j in (0, 1))
    return tried, acc, loss, tried[_best(acc, loss)]


def _best(acc: np.ndarray, loss: np.ndarray) -> int:
    """Highest accuracy; ties to the lowest log-loss (on small separable sets many C tie, and the most regularised
    of them answers right with near-uniform probabilities)."""
    tied = np.flatnonzero(acc >= acc.max() - 1e-9)
    return int(tied[np.argmin(loss[tied])])


def _tried(method: str, Cs, acc, loss) -> dict:
    return {"method": method, "values": [float(c) for c in Cs], "accuracy": [round(float(a), 4) for a in acc],
            "log_loss": [round(float(v), 4) for v in loss]}
