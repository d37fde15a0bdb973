"""fit-head's procedures at scale on synthetic features: the small-data ones at every size (C by inner 5-fold CV,
each fit on one thread; the MLP full-batch) against the scaling ones (C on a hold-out with few fits, threads; the
MLP on minibatches), side by side on the same rows, each scored on 10,000 further rows from the same distribution.
(Up to 2026-12-03 the inner CV scored all 11 C; since 2026-12-04 it walks c_search.search_path like the hold-out.)

The features imitate a real probe, not an easy one: post-ReLU, unit-normalised like CNN embeddings, classes that
overlap (a logistic head reaches ~90 %, not 100 %), 64 informative directions spread over all `--dim`.

    python bench/heads.py [--rows 50000] [--classes 10] [--dim 1280] [--sizes 10000,50000] [--device cpu]
                          [--skip-old-above N] [--features-dtype float16] [--json OUT.json]
                          (bench/README.md has the last run)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from featpipe.heads import HeadConfig, accuracy, fit_head

TEST_ROWS = 10_000


def synthetic(n: int, classes: int, dim: int, seed: int = 0, sep: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes in 64 latent directions, mapped to `dim` features through a random matrix, plus
    per-feature noise, then ReLU. `sep` sets the class overlap (0.4: ~90 % for a logistic head at 10 classes)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((64, dim)).astype(np.float32) / 8.0
    centres = rng.standard_normal((classes, 64)).astype(np.float32) * sep
    y = rng.integers(0, classes, n)
    X = np.empty((n, dim), np.float32)
    for s in range(0, n, 65536):  # in blocks: a million rows must not need several copies in memory
        part = slice(s, s + 65536)
        latent = centres[y[part]] + rng.standard_normal((len(y[part]), 64), dtype=np.float32)
        X[part] = np.maximum(latent @ mix + 0.5 * rng.standard_normal((len(y[part]), dim), dtype=np.float32), 0)
    return X, y


def overlapping(n: int, seed: int = 0, classes: int = 5, dim: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A smaller probe, post-ReLU features of overlapping classes through 16 latent directions (a logistic head is
    right on ~75 % of fresh rows, not 100 %): tests/test_heads.py's and bench/nested_cv.py's."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((16, dim)).astype(np.float32) / 4
    centres = rng.standard_normal((classes, 16)).astype(np.float32) * 0.5
    y = rng.integers(0, classes, n)
    latent = centres[y] + rng.standard_normal((n, 16), dtype=np.float32)
    return np.maximum(latent @ mix + 0.5 * rng.standard_normal((n, dim), dtype=np.float32), 0), y


INNER = {"holdout_rows": 10**12}  # the small-data procedure at every size
PROCEDURES = {  # name -> HeadConfig keywords
    "logistic, inner CV": {"kind": "logistic", **INNER},
    "logistic, scaling": {"kind": "logistic"},
    "mlp, full batch": {"kind": "mlp", "batch_size": 10**12, **INNER},
    "mlp, scaling": {"kind": "mlp"},
}
SMALL = {"logistic, inner CV", "mlp, full batch"}


def run(X, y, rows: int, name: str, device: str) -> dict:
    cfg = HeadConfig(**PROCEDURES[name], device=device)
    train, test = np.arange(rows), np.arange(len(y) - TEST_ROWS, len(y))
    t0 = time.perf_counter()
    head = fit_head(X, y, int(y.max()) + 1, cfg, rows=train)
    seconds = time.perf_counter() - t0
    out = {"rows": rows, "procedure": name, "seconds": round(seconds, 2),
           "test_accuracy": round(accuracy(head, X, y, test), 4)}
    search = head.report.get("c_search")
    if search:
        out |= {"C": search["chosen"], "fits": len(search["values"]) * search.get("folds", 1) + 1,
                "c_search": search}
    else:
        out |= {"epochs": head.params.get("epochs")}
    print(json.dumps({k: v for k, v in out.items() if k != "c_search"}), flush=True)
    return out


def synthetic_arguments() -> argparse.ArgumentParser:
    """--rows, --classes, --dim: the synthetic probe's size (this bench's, and feature_sets_scale.py's parts)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--dim", type=int, default=1280)
    return ap


def main() -> None:
    from run_info import machine  # a sibling script (here, not on import: tests import this file as bench.heads)

    ap = synthetic_arguments()
    ap.add_argument("--sizes", default="10000,50000", help="training sizes besides --rows")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (where the scaling procedures run)")
    ap.add_argument("--skip-old-above", type=int, default=50_000, help="the small-data procedures only up to this "
                    "size")
    ap.add_argument("--only", default="", help="the procedures whose name contains this (default: all)")
    ap.add_argument("--features-dtype", default="float32", help="float32 | float16: how X is held (fit-head's flag)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    sizes = sorted({int(s) for s in a.sizes.split(",") if s} | {a.rows})
    X, y = synthetic(max(sizes) + TEST_ROWS, a.classes, a.dim)
    X = X.astype(a.features_dtype)
    names = [n for n in PROCEDURES if a.only in n]
    results = [run(X, y, n, name, a.device) for n in sizes for name in names
               if name not in SMALL or n <= a.skip_old_above]
    report = {"results": results, "classes": a.classes, "dim": a.dim, "test_rows": TEST_ROWS,
              "features_dtype": a.features_dtype, "machine": machine()}
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
