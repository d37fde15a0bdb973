"""Decoding fast without changing the pixels: torch's resize against torchvision's, draft() against a full decode,
and background decoding that yields the CPU to the model but never starves."""

from __future__ import annotations

import io
import os
import sys
import threading

import numpy as np
import pytest
from PIL import Image, ImageOps
from torchvision import transforms

from featpipe.decode import DRAFT_MARGIN, PilDecoder, pil_decode, probe, resize_crop
from featpipe.preprocess import Preprocessing
from featpipe.registry import resolve

PRE = resolve("mobilenet_v2").preprocessing
MODES = {"bilinear": transforms.InterpolationMode.BILINEAR, "bicubic": transforms.InterpolationMode.BICUBIC}


@pytest.fixture(scope="module")
def photo(shipped) -> Image.Image:
    """A real photo, upscaled so that every test size below is a downscale or an upscale of real detail."""
    src = ImageOps.exif_transpose(Image.open(sorted(shipped.glob("*/*.jpg"))[3])).convert("RGB")
    return src.resize((2000, 1500), Image.Resampling.BICUBIC)


def reference(im: Image.Image, pre: Preprocessing) -> np.ndarray:
    """What torchvision's own transforms give on the Pillow image (the naive pipeline featpipe must match)."""
    tf = transforms.Compose([transforms.Resize(pre.resize, MODES[pre.interpolation]), transforms.CenterCrop(pre.crop)])
    return np.asarray(tf(im))


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "efficientnet_lite0"])  # bilinear 256/224, bicubic 256/224
@pytest.mark.parametrize("size", [(37, 23), (300, 200), (640, 480), (481, 1023), (2000, 1500), (4000, 250)])
def test_resize_crop_gives_torchvisions_pixels(photo, backbone, size):
    pre = resolve(backbone).preprocessing
    im = photo.resize(size, Image.Resampling.BICUBIC)
    out, want = resize_crop(im, pre), reference(im, pre)
    assert out.shape == want.shape == (pre.crop, pre.crop, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - want).max() <= 1


@pytest.mark.parametrize("size", [(1024, 768), (1600, 1200), (1200, 1600), (3000, 2000)])
def test_draft_decoding_stays_close_to_a_full_decode(photo, size):
    """draft() shrinks big JPEGs in the IDCT, keeping DRAFT_MARGIN x the target: the crop stays within ~1 level."""
    pre = PRE
    buf = io.BytesIO()
    photo.resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    drafted = Image.open(io.BytesIO(data))
    drafted.draft("RGB", (round(DRAFT_MARGIN * pre.resize),) * 2)
    assert drafted.size[0] < size[0], "this size should decode at reduced scale"
    diff = np.abs(pil_decode(data, pre).astype(int) - reference(Image.open(io.BytesIO(data)).convert("RGB"), pre))
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 8


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread SCHED_IDLE is Linux's")


@linux_only
def test_background_pool_runs_at_idle_priority_the_rest_keeps_its_own():
    dec = PilDecoder(PRE, 2, model_waiting=threading.Event())
    assert dec.background.submit(os.sched_getscheduler, 0).result() == os.SCHED_IDLE
    assert dec.pool.submit(os.sched_getscheduler, 0).result() == os.SCHED_OTHER
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the calling thread is untouched


@pytest.fixture(scope="module")
def jpegs(shipped) -> list[bytes]:
    return [p.read_bytes() for p in sorted(shipped.glob("*/*.jpg"))[:6]]


def decode_in_thread(dec: PilDecoder, data: list[bytes]) -> tuple[threading.Thread, dict]:
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(result=dec.decode(data, [probe(d) for d in data])), daemon=True)
    t.start()
    return t, out


def assert_same_as_plain_decode(result: tuple, jpegs: list[bytes]) -> None:
    pixels, reasons = result
    want, _ = PilDecoder(PRE, 1).decode(jpegs, [probe(d) for d in jpegs])
    assert reasons == [None] * len(jpegs) and np.array_equal(pixels, want)


def test_a_waiting_model_takes_queued_images_from_a_starved_background_pool(jpegs):
    """Background threads held by other work (as by programs busy on every core): the batch waits while the model
    computes, and finishes on the normal pool once the model waits for it."""
    waiting, release = threading.Event(), threading.Event()
    dec = PilDecoder(PRE, 2, model_waiting=waiting)
    held = [dec.background.submit(release.wait) for _ in range(2)]
    t, out = decode_in_thread(dec, jpegs)
    t.join(0.5)
    assert t.is_alive(), "the batch should wait for the background pool while the model is busy"
    waiting.set()
    t.join(30)
    release.set()
    assert not t.is_alive() and all(h.result() for h in held)
    assert_same_as_plain_decode(out["result"], jpegs)


class StallsInBackground(PilDecoder):
    """Decodes normally, except that a background thread's decode hangs until released: a starved worker."""

    release = threading.Event()

    def decode_one(self, data: bytes):
        if os.sched_getscheduler(0) == os.SCHED_IDLE:
            self.release.wait()
        return super().decode_one(data)


@linux_only
def test_a_waiting_model_redoes_images_a_stalled_background_thread_holds(jpegs):
    waiting = threading.Event()
    dec = StallsInBackground(PRE, 2, model_waiting=waiting)
    waiting.set()
    t, out = decode_in_thread(dec, jpegs)
    t.join(30)
    dec.release.set()
    assert not t.is_alive()
    assert_same_as_plain_decode(out["result"], jpegs)
