"""featpipe.decode on odd modes and hostile bytes: to_rgb gives sensible RGB; probe and decoders never crash or hang."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from featpipe.decode import DaliDecoder, PilDecoder, TorchvisionDecoder, probe, to_rgb
from featpipe.registry import resolve
from tests.conftest import run_json
from tests.faults import faultkit as fk

PRE = resolve("mobilenet_v2").preprocessing


@pytest.fixture(scope="module")
def picture(shipped) -> Image.Image:
    return fk.photo(sorted(shipped.glob("*/*.jpg"))[0], 96)


def close(a: Image.Image, b: Image.Image, tol: float = 2.0) -> bool:
    return a.mode == b.mode == "RGB" and np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() < tol


def test_cmyk_becomes_the_same_rgb(picture):
    assert close(to_rgb(picture.convert("CMYK")), picture)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_gray_is_scaled_not_clipped(picture, mode):
    gray = np.asarray(picture.convert("L"), np.int32)
    wide = Image.fromarray((gray * 257).astype(np.uint16 if mode == "I;16" else np.int32))
    assert wide.mode == mode
    assert close(to_rgb(wide), picture.convert("L").convert("RGB"), 1.0)


@pytest.mark.parametrize("maker", [fk.gray16_png, fk.rgb48_png])
def test_16_bit_png_files_decode_like_8_bit(picture, maker):
    want = picture.convert("L").convert("RGB") if maker is fk.gray16_png else picture
    assert close(to_rgb(Image.open(io.BytesIO(maker(picture)))), want, 1.0)


def test_palette_transparency_is_white(picture):
    p = Image.open(io.BytesIO(fk.palette_png(picture)))
    assert p.mode == "P" and "transparency" in p.info
    out = np.asarray(to_rgb(p))
    transparent = np.asarray(p) == p.info["transparency"]
    assert transparent.any() and (out[transparent] == 255).all()
    assert close(to_rgb(p), p.convert("RGB"), 40.0)  # the opaque rest keeps its colours


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_composites_on_white(picture, mode):
    im = picture.convert(mode)
    im.putalpha(Image.new("L", im.size, 0))
    assert (np.asarray(to_rgb(im)) == 255).all()
    im.putalpha(255)
    assert close(to_rgb(im), picture.convert(mode[:-1]).convert("RGB"), 0.5)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "YCbCr"])
def test_other_modes_are_rgb(picture, mode):
    assert to_rgb(picture.convert(mode)).mode == "RGB"


def test_one_pixel_image_decodes_to_a_full_crop():
    data = fk.png_bytes(Image.new("RGB", (1, 1), (10, 20, 30)))
    out = PilDecoder(PRE, 1).decode_one(data)
    assert out.shape == (PRE.crop, PRE.crop, 3) and (out == (10, 20, 30)).all()


def test_bomb_header_is_refused_without_decoding():
    p = probe(fk.bomb_png())
    assert not p.batch_ok and "too large" in p.skip_reason


# ---- hostile bytes: property-based, time-bounded ------------------------------------------------------------

@pytest.fixture(scope="module")
def decoders():
    pil = PilDecoder(PRE, 2)
    yield pil, [DaliDecoder(PRE, 4, None, 2), TorchvisionDecoder(PRE, None, 2)]
    pil.pool.shutdown()


@pytest.fixture(scope="module")
def jpeg(picture) -> bytes:
    return fk.jpeg_bytes(picture)


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        b[pos % len(b)] = val
    return bytes(b[:cut] if cut else b)


def assert_survives(data: bytes, decoders) -> None:
    """probe, then every decoder: an image of the right shape or a reason, for every input."""
    p = probe(data)
    pil, batched = decoders
    if p.skip_reason:
        return
    one = pil.decode_one(data)
    assert isinstance(one, str) or one.shape == (PRE.crop, PRE.crop, 3)
    for dec in batched:
        batch, reasons = dec.decode([data, data], [p, p])
        assert len(reasons) == 2 and len(batch) == sum(r is None for r in reasons), dec.name


FUZZ = settings(max_examples=30, deadline=5000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_never_crash(data, decoders):
    assert_survives(data, decoders)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=12),
       cut=st.none() | st.integers(1, 1 << 20))
def test_mutated_jpeg_never_crashes(jpeg, edits, cut, decoders):
    assert_survives(mutate(jpeg, edits, cut), decoders)


@pytest.mark.parametrize("decoder", ["dali", "torchvision"])
def test_cli_survives_a_folder_of_hostile_files(tmp_path, jpeg, shipped, decoder):
    """One end-to-end run over seeded random and mutated files beside a real photo: exit 0, the photo embedded."""
    rnd = random.Random(6)
    data = tmp_path / "data" / "x"
    data.mkdir(parents=True)
    (data / "real.jpg").write_bytes(sorted(shipped.glob("*/*.jpg"))[0].read_bytes())
    for i in range(12):
        (data / f"random{i}.jpg").write_bytes(rnd.randbytes(rnd.randrange(1, 4096)))
        edits = [(rnd.randrange(len(jpeg)), rnd.randrange(256)) for _ in range(rnd.randrange(1, 12))]
        (data / f"mutated{i}.jpg").write_bytes(mutate(jpeg, edits, rnd.choice([None, rnd.randrange(1, len(jpeg))])))
    res = run_json("extract", data.parent, "--cache-dir", tmp_path / "cache", "--decoder", decoder, timeout=300)
    assert res["images"] == 25 and res["computed"] + len(res["skipped"]) == 25
    assert str(data / "real.jpg") not in {s["path"] for s in res["skipped"]}


def test_extreme_aspect_ratio_decodes_without_a_huge_resize():
    """1 x 30000 would resize to 256 x 7.68 million pixels (~8 GB) before cropping: only the crop is computed."""
    strip = Image.new("RGB", (1, 30_000), (90, 120, 150))
    out = PilDecoder(PRE, 1).decode_one(fk.png_bytes(strip))
    assert not isinstance(out, str) and out.shape == (PRE.crop, PRE.crop, 3) and (out == (90, 120, 150)).all()
    assert not probe(fk.jpeg_bytes(Image.new("RGB", (30_000, 8)))).batch_ok  # DALI would resize all of it
