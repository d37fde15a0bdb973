"""What a file is before any pixel is decoded: its header (format, size, EXIF orientation), whether the batched
decoders may take it, and the geometry every decoder shares (torchvision's resize and centre-crop rules)."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

# Pillow's own complaints (corrupt EXIF, odd metadata) name no file and change nothing: a file that fails says why.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
MAX_PIXELS = 89_478_485  # Pillow's default limit: an image decoded whole beyond it risks a bomb's memory
JPEG_PIXELS = 4 * MAX_PIXELS  # baseline JPEGs decode scaled down in little memory: a 200-MP camera's are within
Image.MAX_IMAGE_PIXELS = JPEG_PIXELS  # Pillow's check refuses nothing probe() lets through; probe() says the rest
MAX_ASPECT = 16  # longer side / shorter side beyond which DALI is not given the image
# EXIF orientation tag -> the transpose that shows the picture upright (ImageOps.exif_transpose's table)
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


@dataclass(frozen=True)
class Probe:
    """What a cheap header read says about a file: a plain JPEG for the batched decoders (DALI, nvJPEG), a
    Pillow-only image, or a reason to skip."""

    batch_ok: bool
    skip_reason: str | None = None
    size: tuple[int, int] = (0, 0)  # (width, height) after EXIF orientation
    orientation: int = 1  # EXIF orientation tag (1: upright); nvJPEG ignores it, DALI and Pillow apply it


def probe(data: bytes) -> Probe:
    """Parse the header only (no pixel decode); reject what can never decode."""
    if not data:
        return Probe(False, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return Probe(False, f"image too large (over {JPEG_PIXELS} pixels)")
    except UnidentifiedImageError:
        return Probe(False, "not an image")
    except Exception as e:  # Pillow raises many types on malformed headers
        return Probe(False, f"unreadable image header: {e}")
    if w < 1 or h < 1:
        return Probe(False, "image has no pixels")
    if w * h > MAX_PIXELS and not scalable(im):
        return Probe(False, f"image too large (over {MAX_PIXELS} pixels; baseline JPEGs up to {JPEG_PIXELS})")
    orientation = _exif_orientation(im)
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    # JPEG entropy data byte-stuffs 0xFF, so a final EOI marker near the end means the scan was not cut short.
    complete = data.rfind(b"\xff\xd9") >= max(0, len(data) - 1024)
    # DALI resizes the whole image before cropping: a 1 x 20000 strip would become 256 x 5 million pixels.
    squat = max(w, h) <= MAX_ASPECT * min(w, h)
    small = w * h <= MAX_PIXELS  # the batched decoders decode at full size; Pillow's draft() does not
    return Probe(im.format == "JPEG" and im.mode in ("RGB", "L") and complete and squat and small, None, (w, h),
                 orientation)


def scalable(im: Image.Image) -> bool:
    """A baseline JPEG (a camera's MPO too): draft() decodes it scaled down without holding it whole (a progressive
    one keeps every coefficient of the full image in memory)."""
    return isinstance(im, JpegImagePlugin.JpegImageFile) and not im.info.get("progressive")


def _exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag, 1-8, read as exif_transpose reads it: by dict lookup, so "6" or 6.5 mean upright."""
    try:
        tag = im.getexif().get(0x0112, 1)
        return int(tag) if tag in _TRANSPOSE else 1
    except Exception:
        return 1


def upright(im: Image.Image) -> Image.Image:
    """`im` as its EXIF orientation tag says it should be shown."""
    orientation = _exif_orientation(im)
    if orientation != 1:  # not exif_transpose: it also re-encodes the EXIF block, and fails on some it cannot write
        im = im.transpose(_TRANSPOSE[orientation])
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: alpha composited on white, 16-bit scaled, CMYK/palette/gray converted."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float32)
        scale = 257.0 if a.max(initial=0) > 255 else 1.0
        return Image.fromarray(np.clip(a / scale + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info or im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def resized_size(w: int, h: int, shorter: int) -> tuple[int, int]:
    """torchvision's Resize(int) rule: shorter side -> `shorter`, longer side truncated."""
    if w <= h:
        return shorter, max(1, int(shorter * h / w))
    return max(1, int(shorter * w / h)), shorter


def crop_corner(h: int, w: int, crop: int) -> tuple[int, int]:
    """torchvision's CenterCrop corner (Python's round: half to even)."""
    return int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
