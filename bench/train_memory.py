"""Peak memory of one fine-tune epoch against the number of training images: `featpipe finetune --epochs 1` as a
fresh process (its cache already warm, so extraction is not in the figure), its peak RSS from wait4(); the images
are the shipped photos, each re-encoded from a different random crop so every file is distinct.

    python bench/train_memory.py [--images 400,4000] [--method finetune|scratch] [--workdir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from featpipe.dataset import shipped_dataset


def make_images(root: Path, n: int) -> None:
    """n distinct JPEGs in the shipped set's classes, drawn round-robin from its photos."""
    photos = sorted(shipped_dataset().glob("*/*.jpg"))
    rng = np.random.default_rng(n)
    for i in range(n):
        src = photos[i % len(photos)]
        with Image.open(src) as im:
            im = im.convert("RGB")
            w, h = im.size
            cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            out = root / src.parent.name / f"{i:06d}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            im.crop((x, y, x + cw, y + ch)).save(out, quality=90)


def peak_rss_mib(args: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of `python -m featpipe ARGS`."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "featpipe", *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"featpipe {' '.join(args)} failed")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default="400,4000")
    ap.add_argument("--method", default="finetune", choices=["finetune", "scratch"])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/featpipe-train-memory"))
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    results = []
    for n in [int(s) for s in a.images.split(",")]:
        data, cache = a.workdir / f"data{n}", a.workdir / "cache"
        if not data.exists():
            make_images(data, n)
        if a.method == "finetune":  # warm the cache first: the figure is the training's, not extraction's
            subprocess.run([sys.executable, "-m", "featpipe", "extract", str(data), "--cache-dir", str(cache)],
                           check=True, capture_output=True)
        cmd = [a.method, str(data), "--epochs", "1", "--out", str(a.workdir / f"model{n}"), "--force"]
        rss, seconds = peak_rss_mib(cmd + (["--cache-dir", str(cache)] if a.method == "finetune" else []))
        results.append({"images": n, "peak_rss_mib": round(rss, 1), "seconds": round(seconds, 1)})
        print(json.dumps(results[-1]), flush=True)
    ratio = results[-1]["peak_rss_mib"] / results[0]["peak_rss_mib"]
    print(f"{a.method}, one epoch: peak RSS {results[-1]['images']} / {results[0]['images']} images = {ratio:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"method": a.method, "results": results, "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
