"""Decoding fast without changing the pixels: torch's resize against torchvision's, draft() against a full decode,
and the decode thread's lower CPU priority."""

from __future__ import annotations

import io
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageOps
from torchvision import transforms

from featpipe.decode import DRAFT_MARGIN, pil_decode, resize_crop
from featpipe.extract import yield_cpu_to_model
from featpipe.preprocess import Preprocessing
from featpipe.registry import resolve

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
    pre = resolve("mobilenet_v2").preprocessing
    buf = io.BytesIO()
    photo.resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    drafted = Image.open(io.BytesIO(data))
    drafted.draft("RGB", (round(DRAFT_MARGIN * pre.resize),) * 2)
    assert drafted.size[0] < size[0], "this size should decode at reduced scale"
    diff = np.abs(pil_decode(data, pre).astype(int) - reference(Image.open(io.BytesIO(data)).convert("RGB"), pre))
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 8


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_decode_thread_yields_the_cpu_and_its_workers_inherit_it():
    seen = {}

    def decode_thread():
        yield_cpu_to_model()
        seen["self"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        with ThreadPoolExecutor(1) as pool:  # like the decoder's pool, started after the call
            seen["worker"] = pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=decode_thread)
    t.start()
    t.join()
    assert seen == {"self": 19, "worker": 19}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # the model's thread keeps its own
