"""featpipe audit's own work at scale (extraction excluded): near-duplicate search, out-of-fold label issues and the
two CV accuracies, on synthetic features with planted near duplicates and flipped labels, plus the report files
that need no image (audit.md, map.png). Also says how many of the planted ones the audit finds.

    python bench/audit_scale.py [--rows 100000] [--classes 10] [--dim 1280] [--planted 0.01] [--json OUT.json]
                                (bench/README.md has the last run)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from heads import synthetic  # bench/heads.py: the same imitation of real embeddings

from featpipe.audit import AuditConfig, examine
from featpipe.audit_report import markdown, plot_map
from featpipe.extract import ExtractConfig
from featpipe.features import Features


def planted(n: int, classes: int, dim: int, share: float, seed: int = 0):
    """Rows with `share` of them near copies of other rows (same class, small noise) and `share` labels flipped."""
    X, y = synthetic(n, classes, dim, seed)
    rng = np.random.default_rng(seed + 1)
    k = int(share * n)
    src, dst = np.split(rng.choice(n, 2 * k, replace=False), 2)
    X[dst] = X[src] + 0.02 * np.abs(X[src]).mean() * rng.standard_normal((k, dim), dtype=np.float32)
    y[dst] = y[src]
    flipped = rng.choice(np.setdiff1d(np.arange(n), np.concatenate([src, dst])), k, replace=False)
    y[flipped] = (y[flipped] + rng.integers(1, classes, k)) % classes
    return X, y, set(zip(src.tolist(), dst.tolist())), set(flipped.tolist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--planted", type=float, default=0.01)
    ap.add_argument("--json")
    a = ap.parse_args()
    X, y, copies, flipped = planted(a.rows, a.classes, a.dim, a.planted)
    paths = [f"/synthetic/{i:08d}.jpg" for i in range(a.rows)]
    f = Features(X=X, y=y, classes=[f"c{c}" for c in range(a.classes)], paths=paths, result=None,
                 groups=np.arange(a.rows), sha256=[f"{i:064x}" for i in range(a.rows)])
    t0 = time.perf_counter()
    found = examine(f, None, AuditConfig(extract=ExtractConfig()))
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        report = {"data_dir": "synthetic", "test_dir": None, "backbone": "-", "images": a.rows,
                  "near_threshold": AuditConfig.near, **found}
        (Path(d) / "audit.md").write_text(markdown(report))
        plot_map(f, {i["path"] for i in found["label_issues"]}, Path(d) / "map.png")
    files = time.perf_counter() - t0
    row = {p: i for i, p in enumerate(paths)}
    sets = [{row[p] for p in s["paths"]} for s in found["duplicates"]]
    hit = sum(any({s, t} <= g for g in sets) for s, t in copies)
    issues = {row[i["path"]] for i in found["label_issues"]}
    out = {"rows": a.rows, "classes": a.classes, "dim": a.dim, "seconds": found["seconds"] | {"files": files},
           "total_seconds": round(total + files, 1), "planted_copies_found": f"{hit}/{len(copies)}",
           "duplicate_sets": len(sets), "label_issues": len(issues),
           "flipped_found": f"{len(issues & flipped)}/{len(flipped)}", "cv": found["cv"]}
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
