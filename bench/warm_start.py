"""Wall time of the small runs users iterate on: a warm `featpipe fit-head` over N cached images, and `featpipe
predict` of one image, each a fresh process as a user runs it (imports and model load included). Medians of
--repeats; the images are generated JPEGs (10 classes), extracted once before timing.

    python bench/warm_start.py [--images 1000] [--repeats 5] [--workdir DIR]   (bench/README.md has the last run)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        c = i % 10
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        pixels = rng.normal(25 * c, 40, (96, 128, 3)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(d / f"{i:06d}.jpg", quality=85)


def wall(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "featpipe", *args], check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/featpipe-warm-start"))
    a = ap.parse_args()
    data, cache, model = a.workdir / f"data{a.images}", a.workdir / "cache", a.workdir / "model"
    if not data.exists():
        make_images(data, a.images)
    wall("extract", str(data), "--cache-dir", str(cache))  # cold, not timed
    fit = [wall("fit-head", str(data), "--cache-dir", str(cache), "--out", str(model))
           for _ in range(a.repeats)]
    one = next(data.rglob("*.jpg"))
    pred = [wall("predict", str(model), str(one)) for _ in range(a.repeats)]
    print(f"warm fit-head, {a.images} cached images: median {statistics.median(fit):.2f} s "
          f"(runs {', '.join(f'{t:.2f}' for t in fit)})")
    print(f"predict one image: median {statistics.median(pred):.2f} s (runs {', '.join(f'{t:.2f}' for t in pred)})")


if __name__ == "__main__":
    main()
