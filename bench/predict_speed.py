"""featpipe predict (a head-only bundle, through extract's engine and cache) against featpipe extract on the same
kind of new images, both cold, side by side; and the old per-batch Pillow path (predict.probabilities) for context.
Also a second predict of the same files (warm: cache lookups only).

    python bench/predict_speed.py [--images 1000] [--repeats 3] [--workdir DIR] [--json OUT.json]
                                  (bench/README.md has the last run)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from featpipe.dataset import shipped_dataset
from featpipe.extract import ExtractConfig, extract
from featpipe.fit_head import FitConfig, fit_and_save
from featpipe.heads import HeadConfig
from featpipe.predict import PredictConfig, collect, predict, probabilities
from featpipe import bundle as B


def new_images(src: Path, dst: Path, n: int, seed: int) -> Path:
    """n JPEGs made from the shipped photos (random crop of 90 %, quality 90): other bytes than any cached file."""
    rng = np.random.default_rng(seed)
    photos = sorted(src.glob("*/*.jpg"))
    dst.mkdir(parents=True)
    for i in range(n):
        with Image.open(photos[i % len(photos)]) as im:
            w, h = im.size
            x, y = int(rng.integers(0, w // 10 + 1)), int(rng.integers(0, h // 10 + 1))
            im.convert("RGB").crop((x, y, x + int(w * 0.9), y + int(h * 0.9))).save(dst / f"{i:05d}.jpg", quality=90)
    return dst


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir")
    ap.add_argument("--json")
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="featpipe-predict-"))
    model = work / "model"
    fit_and_save(FitConfig(extract=ExtractConfig(cache_dir=work / "fit-cache"), head=HeadConfig(), out=model),
                 progress=False)
    rows = []
    for r in range(a.repeats):  # a fresh image set per run and method: every run is cold
        e_dir, p_dir, o_dir = (new_images(shipped_dataset(), work / f"{k}{r}", a.images, 10 * r + j)
                               for j, k in enumerate(("e", "p", "o")))
        ext = timed(lambda: extract(ExtractConfig(data_dir=e_dir, cache_dir=work / f"ce{r}")))
        cfg = PredictConfig(model=model, paths=[p_dir], top_k=1, cache_dir=work / f"cp{r}")
        pred = timed(lambda: predict(cfg))
        warm = timed(lambda: predict(cfg))
        old = timed(lambda: probabilities(B.load(model), collect([o_dir]), "cpu"))
        rows.append({"extract_img_s": a.images / ext, "predict_img_s": a.images / pred,
                     "predict_warm_s": warm, "old_predict_img_s": a.images / old})
        print(json.dumps({k: round(v, 2) for k, v in rows[-1].items()}), flush=True)
    med = {k: round(statistics.median(x[k] for x in rows), 2) for k in rows[0]}
    out = {"images": a.images, "repeats": a.repeats, "median": med,
           "predict_vs_extract": round(statistics.median(x["predict_img_s"] / x["extract_img_s"] for x in rows), 3),
           "predict_vs_old": round(statistics.median(x["predict_img_s"] / x["old_predict_img_s"] for x in rows), 3),
           "runs": rows}
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
