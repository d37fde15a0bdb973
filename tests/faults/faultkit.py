"""Shared helpers of the fault suite: bad and unusual image files made from real photos, cache readers."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from featpipe.cache import Cache
from featpipe.shards import CacheKey, tables
from featpipe.rows import Rows
from featpipe.extract import ExtractConfig, key_precision
from featpipe.registry import resolve
from featpipe.weights import known_sha256


def photo(src: Path, side: int = 320) -> Image.Image:
    """A real photo, shrunk so every variant stays small and fast to decode."""
    im = Image.open(src).convert("RGB")
    im.thumbnail((side, side))
    return im


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def bad_exif_jpeg(im: Image.Image) -> bytes:
    """A good JPEG behind an EXIF block whose first directory claims 65,535 entries (Pillow warns, then reads on)."""
    app1 = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + bytes(10)
    return b"\xff\xd8\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + jpeg_bytes(im)[2:]


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def png_chunks(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """(offset, type, body) of each chunk of a PNG."""
    pos, out = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        out.append((pos, data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]))
        pos += 12 + n
    return out


def raw_png(width: int, height: int, color_type: int, bit_depth: int, pixels: bytes) -> bytes:
    """A PNG written by hand: Pillow cannot write 48-bit RGB, nor a header that lies about the size."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b"")


def rgb48_png(im: Image.Image) -> bytes:
    """16-bit-per-channel RGB PNG of an 8-bit RGB picture (each value v -> v * 257)."""
    a = (np.asarray(im, np.uint16) * 257).astype(">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in a)
    return raw_png(im.width, im.height, 2, 16, rows)


def gray16_png(im: Image.Image) -> bytes:
    a = (np.asarray(im.convert("L"), np.uint16) * 257).astype(">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in a)
    return raw_png(im.width, im.height, 0, 16, rows)


def jpeg_claiming(width: int, height: int, progressive: bool = False) -> bytes:
    """A small JPEG whose frame header claims width x height (its scan is for 8 x 8 pixels)."""
    data = bytearray(jpeg_bytes(Image.new("L", (8, 8)), progressive=progressive))
    sof = data.find(b"\xff\xc2" if progressive else b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def bomb_png() -> bytes:
    """A valid PNG header claiming 100000 x 100000 pixels; Pillow refuses it before reading any pixel data."""
    return raw_png(100_000, 100_000, 2, 8, b"")


def corrupt_crc_png(im: Image.Image) -> bytes:
    """A PNG whose IHDR CRC is wrong."""
    data = bytearray(png_bytes(im))
    pos, _, body = png_chunks(bytes(data))[0]
    data[pos + 8 + len(body)] ^= 0xFF
    return bytes(data)


def palette_png(im: Image.Image) -> bytes:
    """Palette PNG with a transparent index (the colour of pixel (0, 0), so some pixels really are transparent)."""
    p = im.quantize(64)
    return png_bytes(p, transparency=p.getpixel((0, 0)))


def rgba_png(im: Image.Image) -> bytes:
    rgba = im.convert("RGBA")
    rgba.putalpha(255)
    return png_bytes(rgba)


def cache_for(cache_dir: Path, backbone: str = "mobilenet_v2") -> Cache:
    """The one cache of this backbone under cache_dir (whatever precision the run chose)."""
    keys = [k for _, k in tables(cache_dir) if k is not None and k.backbone == backbone]
    assert len(keys) <= 1, keys
    if keys:
        return Cache(cache_dir, keys[0])
    spec = resolve(backbone)  # no table yet (a run killed before its first publish): the key a default run uses
    precision = key_precision(ExtractConfig())
    return Cache(cache_dir, CacheKey(spec.name, known_sha256(spec), spec.preprocessing, spec.dim, precision))


def read_rows(cache_dir: Path, backbone: str = "mobilenet_v2") -> Rows:
    """Every row a reader sees: the live shards plus any journal a killed run left."""
    return cache_for(cache_dir, backbone).read()


def by_path(rows: Rows) -> dict[str, np.ndarray]:
    return {p: rows.embeddings[i] for i, p in enumerate(rows.paths)}


def sha256_of(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def h5_opens(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            f["embeddings"][:]
        return True
    except OSError:
        return False


def is_root() -> bool:
    return os.geteuid() == 0
