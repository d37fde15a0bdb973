"""`--backbone auto`'s head side at scale, on synthetic parts: the choice with every candidate fitted on all N
training rows (what auto did before CHOOSE_ROWS) against the shipped one (candidates compared on a sample, the pick
fitted on all rows), side by side on the same rows: seconds, peak memory the choice added (tracemalloc: numpy's
arrays), the set each picks, and the picked head's accuracy on fresh rows.

    python bench/feature_sets_scale.py [--rows 50000] [--classes 10] [--dim 1280] [--what choice,memory]
                                       [--choose-rows N] [--json OUT.json]          (bench/README.md has the last run)

`memory`: the peak memory of putting all 8 parts side by side, as auto's features are held: the hstack of
normalised copies featpipe did before against feature_sets.side_by_side (one array filled a part at a time).

The parts imitate 4 backbones and their flip-averaged rows: one latent per image (overlapping classes, as in
bench/heads.py), which each backbone sees through its own projection with its own amount of noise; a flip-averaged
part averages two noise draws (less noise), and two backbones' noise is independent, so a pair should win.
"""

from __future__ import annotations

import json
import sys
import time
import tracemalloc
from pathlib import Path

import featpipe  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)
import numpy as np

from featpipe import feature_sets
from featpipe.heads import HeadConfig

sys.path.insert(0, str(Path(__file__).parent))
from heads import synthetic_arguments  # noqa: E402  (sibling scripts, not a package)

TEST_ROWS = 10_000
NOISE = {"b0": 2.0, "b1": 2.2, "b2": 2.4, "b3": 2.6}  # per imitated backbone


def parts(n: int, classes: int, dim: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, 64)).astype(np.float32) * 0.4
    y = rng.integers(0, classes, n)
    latent = centres[y] + rng.standard_normal((n, 64), dtype=np.float32)
    blocks = {}
    for name, noise in NOISE.items():
        mix = rng.standard_normal((64, dim)).astype(np.float32) / 8.0
        clean = latent @ mix
        one, two = (noise * rng.standard_normal((n, dim), dtype=np.float32) for _ in range(2))
        blocks[name] = np.maximum(clean + one, 0)
        blocks[name + feature_sets.FLIP] = np.maximum(clean + (one + two) / 2, 0)
        del clean, one, two
    return blocks, y


def run(blocks, y, classes: int, train: np.ndarray, test: np.ndarray, max_rows: int, label: str) -> dict:
    tracemalloc.start()
    t0 = time.perf_counter()
    c = feature_sets.choose(blocks, y, classes, HeadConfig(), None, train, max_rows=max_rows)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    pred = c.head.predict_proba(feature_sets.matrix(blocks, c.parts)[test]).argmax(1)
    out = {"procedure": label, "compared_on_rows": c.rows, "seconds": round(seconds, 1),
           "peak_mib": round(peak / 2**20), "chosen": feature_sets.name(c.parts),
           "test_accuracy": round(float((pred == y[test]).mean()), 4)}
    print(json.dumps(out), flush=True)
    return out


def hstack_before(blocks: list[np.ndarray]) -> np.ndarray:
    return np.hstack([b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12) for b in blocks]
                     ).astype(np.float32)


def memory(blocks: dict[str, np.ndarray]) -> list[dict]:
    size = sum(b.nbytes for b in blocks.values())
    out = []
    for label, join in (("hstack of copies (before)", hstack_before), ("filled in place", feature_sets.side_by_side)):
        tracemalloc.start()
        X = join(list(blocks.values()))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del X
        out.append({"procedure": label, "parts_mib": round(size / 2**20), "peak_added_mib": round(peak / 2**20)})
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    ap = synthetic_arguments()
    ap.add_argument("--what", default="choice,memory")
    ap.add_argument("--choose-rows", type=int, default=feature_sets.CHOOSE_ROWS, help="the sample's size (default: "
                    "featpipe's)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    blocks, y = parts(a.rows + TEST_ROWS, a.classes, a.dim)
    train, test = np.arange(a.rows), np.arange(a.rows, a.rows + TEST_ROWS)
    report = {"rows": a.rows, "classes": a.classes, "dim": a.dim, "choose_rows": a.choose_rows}
    if "memory" in a.what:
        report["memory"] = memory(blocks)
    if "choice" in a.what:
        report["results"] = [run(blocks, y, a.classes, train, test, a.choose_rows, "sample (shipped)"),
                             run(blocks, y, a.classes, train, test, 10**12, "every row")]
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
