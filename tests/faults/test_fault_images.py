"""Bad and unusual images beside good ones: each is embedded correctly or skipped with a reason, never fatal."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli
from tests.faults import faultkit as fk

SKIP = "skip"  # expected outcome: listed in "skipped" with a reason
# variant file -> the reference picture (in class "ref") its embedding must match
SAME_AS = {"cmyk.jpg": "rgb.jpg", "rgb48.png": "rgb.jpg", "rgba.png": "rgb.jpg", "gray16.png": "gray.jpg",
           "palette.png": "palette.jpg"}


def composite_on_white(p: Image.Image) -> Image.Image:
    """Independent of featpipe.decode.to_rgb: what a palette image with transparency should look like."""
    a = np.asarray(p.convert("RGBA"), np.float32)
    rgb = a[..., :3] * a[..., 3:] / 255 + 255 * (1 - a[..., 3:] / 255)
    return Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")


def build(data: Path, shipped: Path) -> dict[str, str | None]:
    """Add the bad files to `data` (real photos beside them); returns {path: SKIP or reference path or None}."""
    src = sorted(shipped.glob("*/*.jpg"))[0]
    im = fk.photo(src)
    bad, ref = data / sorted(p.name for p in data.iterdir())[0], data / "ref"
    ref.mkdir()
    pal = im.quantize(64)
    files = {
        bad / "empty.jpg": (b"", SKIP),
        bad / "truncated.jpg": (src.read_bytes()[: src.stat().st_size // 2], SKIP),
        bad / "garbage.jpg": (random.Random(0).randbytes(5000), SKIP),
        bad / "notes.txt": ("not an image — just text\n".encode(), SKIP),
        bad / "crc.png": (fk.corrupt_crc_png(im), SKIP),
        bad / "bomb.png": (fk.bomb_png(), SKIP),
        bad / "cmyk.jpg": (fk.jpeg_bytes(im.convert("CMYK")), None),
        bad / "gray16.png": (fk.gray16_png(im), None),
        bad / "rgb48.png": (fk.rgb48_png(im), None),
        bad / "palette.png": (fk.png_bytes(pal, transparency=pal.getpixel((0, 0))), None),
        bad / "rgba.png": (fk.rgba_png(im), None),
        bad / "tiny.png": (fk.png_bytes(Image.new("RGB", (1, 1), (200, 30, 30))), None),
        bad / "tiny.jpg": (fk.jpeg_bytes(Image.new("RGB", (1, 1), (30, 200, 30))), None),
        bad / "bad exif.jpg": (fk.bad_exif_jpeg(im), None),
        bad / "108 megapixels.jpg": (fk.jpeg_bytes(Image.new("L", (12000, 9000), 128)), None),  # phones take these
        bad / "claims 400 megapixels.jpg": (fk.jpeg_claiming(20000, 20000), SKIP),
        bad / "claims 108 megapixels, progressive.jpg": (fk.jpeg_claiming(12000, 9000, progressive=True), SKIP),
        bad / "claims 100 megapixels.png": (fk.raw_png(10_000, 10_000, 2, 8, b""), SKIP),  # held whole: refused
        ref / "rgb.jpg": (fk.jpeg_bytes(im), None),
        ref / "gray.jpg": (fk.jpeg_bytes(im.convert("L").convert("RGB")), None),
        ref / "palette.jpg": (fk.jpeg_bytes(composite_on_white(pal)), None),
        data / "café ü 写真" / "my photo ü.jpg": (fk.jpeg_bytes(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)), None),
        ref / "same bytes as a photo.jpg": (src.read_bytes(), None),  # one row, two files
    }
    for path, (blob, _) in files.items():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(blob)
    raw_dir = os.fsencode(data) + b"/cls \xff"  # a class and a file name that are not UTF-8
    os.mkdir(raw_dir)
    raw_file = raw_dir + b"/img \xfe.jpg"
    with open(raw_file, "wb") as fh:
        fh.write(fk.jpeg_bytes(im.rotate(90, expand=True)))
    (bad / "loop_a.jpg").symlink_to(bad / "loop_b.jpg")
    (bad / "loop_b.jpg").symlink_to(bad / "loop_a.jpg")
    (bad / "dirloop").symlink_to(bad, target_is_directory=True)  # must not be walked into forever
    expect = {str(p): out for p, (_, out) in files.items()}
    expect.update({str(bad / "loop_a.jpg"): SKIP, str(bad / "loop_b.jpg"): SKIP, os.fsdecode(raw_file): None})
    if not fk.is_root():  # root reads mode-000 files anyway
        (bad / "noperm.jpg").write_bytes(fk.jpeg_bytes(im))
        (bad / "noperm.jpg").chmod(0)
        expect[str(bad / "noperm.jpg")] = SKIP
    return expect


@pytest.mark.parametrize("decoder", ["pil", "dali"])
def test_bad_images_beside_good_ones(small_data, shipped, tmp_path, decoder):
    good_before = sorted(str(p) for p in small_data.glob("*/*.jpg"))
    expect = build(small_data, shipped)
    cache = tmp_path / "cache"
    proc = run_cli("extract", small_data, "--cache-dir", cache, "--decoder", decoder, "--precision", "fp32",
                   "--batch-size", "8", "--json", timeout=300, check=True)
    res = json.loads(proc.stdout)
    assert res["decoder"].startswith(decoder) and "Warning" not in proc.stderr, proc.stderr  # Pillow's name no file
    skipped = {s["path"]: s["reason"] for s in res["skipped"]}
    assert set(skipped) == {p for p, out in expect.items() if out == SKIP}, skipped
    assert all(r.strip() for r in skipped.values())
    bad = small_data / sorted(os.listdir(small_data))[0]
    assert "too large" in skipped[str(bad / "bomb.png")]
    assert "too large" in skipped[str(bad / "claims 400 megapixels.jpg")]
    assert all(skipped[str(bad / f"claims {n}")].endswith("baseline JPEGs up to 357913940)")
               for n in ("108 megapixels, progressive.jpg", "100 megapixels.png"))
    rows = fk.read_rows(cache)
    embedded = set(good_before) | {p for p, out in expect.items() if out != SKIP}
    digests = {fk.sha256_of(p) for p in embedded}
    assert digests <= set(rows.sha256) and res["computed"] == len(digests) == len(rows)
    assert res["images"] == len(good_before) + len(expect)
    # every file is accounted for once: the identical copy is served by its twin's row ("reused")
    assert res["computed"] + res["reused"] + len(res["skipped"]) == res["images"] and res["reused"] == 1
    assert np.isfinite(rows.embeddings).all() and (np.linalg.norm(rows.embeddings, axis=1) > 0).all()
    emb = fk.by_path(rows)
    ref = small_data / "ref"
    for variant, reference in SAME_AS.items():
        path = next(p for p in embedded if p.endswith("/" + variant))
        assert fk.cosine(emb[path], emb[str(ref / reference)]) > 0.97, (variant, reference)
