"""Nested 5-fold CV accuracy (and seconds) of fit-head's logistic procedure, the whole C search refitted per outer
fold, on four sets x three seeds: the shipped photos and bench/warm_start.py's 1,000 generated JPEGs (mobilenet_v2
features, extracted once into --workdir), and two synthetic sets of overlapping post-ReLU classes (1,500 x 1280).
Run it on two commits (PYTHONPATH on a worktree of the other) to compare their C searches.

    python bench/nested_cv.py [--workdir DIR] [--json OUT.json]   (bench/README.md has the last run)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from featpipe.extract import ExtractConfig
from featpipe.features import load_features
from featpipe.heads import HeadConfig, cross_validate

sys.path.insert(0, str(Path(__file__).parent))
from heads import overlapping  # noqa: E402  (sibling scripts, not a package)
from warm_start import make_images  # noqa: E402


def sets(workdir: Path) -> dict:
    out = {}
    generated = workdir / "data1000"
    if not generated.exists():
        make_images(generated, 1000)
    for name, data in (("shipped", None), ("generated-1000", generated)):
        f = load_features(ExtractConfig(data_dir=data, cache_dir=workdir / "cache"), progress=False)
        out[name] = (f.X, f.y, f.classes, f.groups)
    for seed in (0, 1):
        X, y = overlapping(1500, seed, dim=1280)
        out[f"overlapping-{seed}"] = (X, y, [str(c) for c in range(5)], np.arange(len(y)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/featpipe-nested-cv"))
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    results = {}
    for name, (X, y, classes, groups) in sets(a.workdir).items():
        for seed in (0, 1, 2):
            t0 = time.perf_counter()
            mean, _ = cross_validate(X, y, classes, 5, HeadConfig(kind="logistic", seed=seed), groups)
            results[f"{name}/{seed}"] = {"cv_accuracy": round(mean, 4), "seconds": round(time.perf_counter() - t0, 1)}
            print(name, seed, results[f"{name}/{seed}"], flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
