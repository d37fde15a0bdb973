"""`--backbone auto` against each offline backbone alone (plain and flip-averaged): nested CV accuracy on image
sets of different kinds, several seeds (issue 23's targets: auto >= mobilenet_v2 + 1.5 points on average, no set
more than 0.5 points below it).

    python bench/feature_sets.py [--sets photos,icons,digits] [--seeds 0,1,2] [--folds 5] [--workdir DIR]
                                 [--json OUT.json]          (bench/README.md has the last run)

The sets, built from what installs here (a set whose source is missing is skipped, with the command that adds it):
- photos: the shipped gcompris photos (5 classes, 196 images).
- icons: Oxygen's 128 px icons (`apt-get install oxygen-icon-theme`), drawn on white, one class per icon
  category (actions, apps, devices, mimetypes, places, status), at most 60 each: flat drawings, not photos.
- digits: scikit-learn's 8 x 8 grey-scale handwritten digits, 50 per class, upscaled to 64 px: tiny grey images.
- glyphs: the letters a b d e g h k q r y, each in every installed DejaVu and URW font (`apt-get install
  fonts-urw-base35`), twice at a seeded size, offset and tilt: printed type, grey on white.
Embeddings come from featpipe's own cache (extract per backbone, its seconds reported), heads from featpipe's
logistic head with its C search; every procedure sees the same outer folds, identical files kept in one fold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import featpipe  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)
import numpy as np
from PIL import Image

from featpipe import feature_sets
from featpipe.dataset import shipped_dataset
from featpipe.extract import ExtractConfig
from featpipe.features import load_features
from featpipe.heads import HeadConfig, cross_validate

ICONS = Path("/usr/share/icons/oxygen/base/128x128")
FONTS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/opentype/urw-base35"))
LETTERS = "abdeghkqry"
ICON_CLASSES = ("actions", "apps", "devices", "mimetypes", "places", "status")


def build_icons(dst: Path) -> Path | None:
    if not ICONS.is_dir():
        print(f"icons skipped: no {ICONS} (apt-get install oxygen-icon-theme)", file=sys.stderr)
        return None
    for cls in ICON_CLASSES:
        (dst / cls).mkdir(parents=True, exist_ok=True)
        for f in sorted((ICONS / cls).glob("*.png"))[:60]:
            im = Image.open(f).convert("RGBA")
            white = Image.new("RGBA", im.size, "white")
            Image.alpha_composite(white, im).convert("RGB").save(dst / cls / f.name)
    return dst


def build_digits(dst: Path) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in range(10):
        (dst / str(c)).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(d.target == c)[:50]:
            px = (255 - d.images[i] * 255 / 16).astype(np.uint8)  # dark ink on white paper
            Image.fromarray(px, "L").resize((64, 64), Image.Resampling.BICUBIC).save(dst / str(c) / f"{i:04d}.png")
    return dst


def build_glyphs(dst: Path) -> Path | None:
    from PIL import ImageDraw, ImageFont

    fonts = sorted(f for d in FONTS if d.is_dir() for f in d.iterdir() if f.suffix in (".ttf", ".otf")
                   and "Math" not in f.name and "Symbol" not in f.name and "D050000L" not in f.name)
    if len(fonts) < 20:
        print("glyphs skipped: too few fonts (apt-get install fonts-urw-base35)", file=sys.stderr)
        return None
    rng = np.random.default_rng(0)
    for c in LETTERS:
        (dst / c).mkdir(parents=True, exist_ok=True)
        for f in fonts:
            for k in range(2):
                im = Image.new("L", (96, 96), 255)
                font = ImageFont.truetype(str(f), int(rng.integers(40, 70)))
                ImageDraw.Draw(im).text((48 + rng.integers(-10, 11), 48 + rng.integers(-10, 11)), c, fill=0,
                                        font=font, anchor="mm")
                im.rotate(float(rng.uniform(-15, 15)), fillcolor=255).save(dst / c / f"{f.stem}-{k}.png")
    return dst


def build(name: str, work: Path) -> Path | None:
    dst = work / "sets" / name
    if name == "photos":
        return shipped_dataset()
    if (dst / ".complete").exists():
        return dst
    out = {"icons": build_icons, "digits": build_digits, "glyphs": build_glyphs}[name](dst)
    if out:
        (dst / ".complete").touch()
    return out


def blocks_of(data: Path, work: Path):
    """What --backbone auto extracts (every offline backbone, plain and flip-averaged) for `data`: the parts'
    rows, labels, classes, groups of identical files, and each extract's seconds (0 once cached)."""
    parts = ",".join(feature_sets.parts(feature_sets.AUTO))
    f = load_features(ExtractConfig(data_dir=data, backbone=parts, cache_dir=work / "cache", device="cpu"),
                      progress=False)
    seconds = {feature_sets.part_of(r.cache.key): round(r.seconds, 1) for r in f.results}
    return f.blocks(), f.y, f.classes, f.groups, seconds


def run_set(name: str, data: Path, args) -> dict:
    blocks, y, classes, groups, seconds = blocks_of(data, args.workdir)
    fixed = {b: [] for b in blocks}
    auto, picks = [], []
    for seed in args.seeds:
        cfg = HeadConfig(seed=seed)
        for b in blocks:
            fixed[b].append(cross_validate(blocks[b], y, classes, args.folds, cfg, groups)[0])
        mean, _std, chosen = feature_sets.nested_cv(blocks, y, classes, args.folds, cfg, groups)
        auto.append(mean)
        picks += chosen
        print(f"{name} seed {seed}: auto {mean:.4f} " + " ".join(f"{b} {fixed[b][-1]:.4f}" for b in blocks),
              file=sys.stderr)
    base = float(np.mean(fixed["mobilenet_v2"]))
    return {"images": len(y), "classes": len(classes), "extract_seconds": seconds,
            "nested_cv": {b: round(float(np.mean(v)), 4) for b, v in fixed.items()} | {"auto": round(
                float(np.mean(auto)), 4)},
            "auto_minus_mobilenet_v2_points": round(100 * (float(np.mean(auto)) - base), 2),
            "auto_picks": {p: picks.count(p) for p in sorted(set(picks))}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default="photos,icons,digits,glyphs")
    p.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/featpipe-feature-sets"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    res = {}
    for name in args.sets.split(","):
        data = build(name, args.workdir)
        if data is not None:
            res[name] = run_set(name, data, args)
    gains = [r["auto_minus_mobilenet_v2_points"] for r in res.values()]
    res["summary"] = {"mean_gain_points": round(float(np.mean(gains)), 2), "worst_gain_points": min(gains),
                      "seeds": args.seeds, "folds": args.folds}
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
