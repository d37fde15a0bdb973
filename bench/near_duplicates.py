"""Where to draw the near-duplicate line: the cosine between a photo's embedding and that of an edited copy of it,
against the cosine between distinct photos, on the shipped set (or `--data`, an ImageFolder).

Every photo is stored as is and as edited copies: mild ones a near-duplicate search must catch (JPEG q60, resized
to 80 % at q90, 5 % cropped off centred or at the top-left at q95) and stronger ones for context (JPEG q30, resized
to 50 %, 10 % cropped off at a corner, mirrored). All are embedded in-process by `featpipe.extract` and
unit-normalised. Pairs of originals that are the same picture at another size (thumbnails that correlate) count as
neither distinct nor edited: they are listed on their own.

    python bench/near_duplicates.py [--data DIR] [--backbone mobilenet_v2] [--precision auto] [--workdir DIR]
                                    [--json OUT.json]      (bench/README.md has the last run)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from featpipe.dataset import shipped_dataset
from featpipe.extract import ExtractConfig, extract
from run_info import machine  # (a sibling script: bench/ is on sys.path when one runs)

THRESHOLDS = (0.88, 0.90, 0.91, 0.92, 0.93)
SAME_PICTURE_COSINE, SAME_PICTURE_THUMB = 0.94, 0.99


def crop(im: Image.Image, keep: float, centred: bool) -> Image.Image:
    w, h = im.size
    cw, ch = round(w * keep), round(h * keep)
    left, top = ((w - cw) // 2, (h - ch) // 2) if centred else (0, 0)
    return im.crop((left, top, left + cw, top + ch))


def scaled(im: Image.Image, f: float) -> Image.Image:
    return im.resize((round(im.width * f), round(im.height * f)), Image.LANCZOS)


EDITS = {  # name -> (what it does to the picture, JPEG quality); the first four are the mild ones
    "JPEG q60": (lambda im: im, 60),
    "resize 80 % (q90)": (lambda im: scaled(im, 0.8), 90),
    "crop 5 % centred (q95)": (lambda im: crop(im, 0.95, True), 95),
    "crop 5 % top-left (q95)": (lambda im: crop(im, 0.95, False), 95),
    "JPEG q30": (lambda im: im, 30),
    "resize 50 % (q90)": (lambda im: scaled(im, 0.5), 90),
    "crop 10 % top-left (q95)": (lambda im: crop(im, 0.9, False), 95),
    "horizontal flip (q95)": (ImageOps.mirror, 95),
}


def make_copies(data: Path, out: Path) -> list[tuple[str, str]]:
    """out/<class>/<n>-<edit index>.jpg for every image of data (0: the file itself). Returns (class, name) per n."""
    photos = []
    for f in sorted(p for p in data.glob("*/*") if p.is_file()):
        try:
            im = Image.open(f)
            im.load()
        except OSError:  # not an image (SOURCES.txt)
            continue
        im = ImageOps.exif_transpose(im).convert("RGB")  # featpipe shows the original upright: so must the copies be
        d = out / f.parent.name
        d.mkdir(parents=True, exist_ok=True)
        n = len(photos)
        shutil.copyfile(f, d / f"{n}-0{f.suffix}")
        for k, (edit, quality) in enumerate(EDITS.values(), 1):
            edit(im).save(d / f"{n}-{k}.jpg", quality=quality)
        photos.append((f.parent.name, f.name))
    return photos


def thumbnail(path: str) -> np.ndarray:
    t = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("L").resize((64, 64), Image.LANCZOS), float)
    t = (t - t.mean()).ravel()
    return t / np.linalg.norm(t)  # so that a dot product of two is their correlation


def stats(x: np.ndarray) -> dict:
    return {"min": x.min(), "p1": np.percentile(x, 1), "p5": np.percentile(x, 5), "median": np.median(x)}


def table(header: list[str], rows: list[list]) -> str:
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)
    lines = [header, ["---"] + ["---:"] * (len(header) - 1)] + [[cell(v) for v in r] for r in rows]
    return "\n".join("| " + " | ".join(r) + " |" for r in lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="an ImageFolder (default: the shipped photos)")
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--workdir", default=None, help="where the copies and the cache go (default: a temp dir, removed)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="featpipe-near-"))
    try:
        photos = make_copies(a.data or shipped_dataset(), work / "copies")
        r = extract(ExtractConfig(data_dir=work / "copies", cache_dir=work / "cache", backbone=a.backbone,
                                  precision=a.precision))
        E = r.cache.embeddings([m.sha256 for m in r.members]).astype(np.float64)
        E /= np.linalg.norm(E, axis=1, keepdims=True)
        row = {Path(m.path).stem: i for i, m in enumerate(r.members)}  # "<n>-<edit index>"
        at = lambda k: E[[row[f"{n}-{k}"] for n in range(len(photos))]]
        O = at(0)
        thumbs = np.stack([thumbnail(r.members[row[f"{n}-0"]].path) for n in range(len(photos))])
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)

    edits = {name: np.einsum("ij,ij->i", O, at(k)) for k, name in enumerate(EDITS, 1)}
    S, T = O @ O.T, thumbs @ thumbs.T
    i, j = np.triu_indices(len(photos), 1)
    cos, corr = S[i, j], T[i, j]
    same_picture = (cos > SAME_PICTURE_COSINE) & (corr > SAME_PICTURE_THUMB)
    distinct = ~same_picture
    same_class = np.array([photos[p][0] == photos[q][0] for p, q in zip(i, j)])
    name = lambda n: "/".join(photos[n])
    d = cos[distinct]
    false_pairs = {t: int((d >= t).sum()) for t in THRESHOLDS}
    distinct_stats = {"max": d.max(), "p99.9": np.percentile(d, 99.9),
                      "p99": np.percentile(d, 99), "same-class max": cos[distinct & same_class].max(),
                      "different-class max": cos[distinct & ~same_class].max()}
    top = [(cos[k], name(i[k]), name(j[k])) for k in np.flatnonzero(distinct)[np.argsort(-d)[:5]]]
    same = [(cos[k], corr[k], name(i[k]), name(j[k])) for k in np.flatnonzero(same_picture)]

    print(f"{len(photos)} photos, {r.backbone} ({r.precision}, {r.device}), {r.images} files embedded\n")
    print(table(["edited copy vs its original", "min", "p1", "p5", "median", *(f"≥ {t:.2f}" for t in THRESHOLDS)],
                [[e, *stats(c).values(), *(f"{(c >= t).mean():.1%}" for t in THRESHOLDS)]
                 for e, c in edits.items()]
                + [["false pairs among distinct photos", "", "", "", "", *false_pairs.values()]]))
    print("\n" + table(["distinct photos: cosine", *distinct_stats], [[f"{len(d):,} pairs", *distinct_stats.values()]]))
    print("\n" + (table(["same picture at another size", "cosine", "thumbnail correlation"],
                        [[f"{p} / {q}", c, t] for c, t, p, q in same]) if same else "no same picture at another size"))
    print("\n" + table(["most similar distinct photos", "cosine"], [[f"{p} / {q}", c] for c, p, q in top]))

    if a.json:
        Path(a.json).write_text(json.dumps({
            "backbone": r.backbone, "precision": r.precision, "device": r.device, "photos": len(photos),
            "edits": {e: {k: float(v) for k, v in stats(c).items()} | {f"caught_{t}": float((c >= t).mean())
                                                                        for t in THRESHOLDS} for e, c in edits.items()},
            "distinct": {k: float(v) for k, v in distinct_stats.items()} | {"pairs": len(d)},
            "false_pairs": false_pairs,
            "same_picture": [{"cosine": float(c), "thumbnail_corr": float(t), "a": p, "b": q} for c, t, p, q in same],
            "top_distinct": [{"cosine": float(c), "a": p, "b": q} for c, p, q in top],
            "machine": machine()},
            indent=1))


if __name__ == "__main__":
    main()
