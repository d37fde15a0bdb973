"""Pillow: one image's bytes -> a (crop, crop, 3) uint8 array, and PilDecoder, which runs it on a thread pool and,
while the model computes on the same cores, on a background pool that only takes idle cores."""

from __future__ import annotations

import io
import os
import sys
import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import numpy as np
from PIL import Image, JpegImagePlugin

from featpipe.decode.pixels import rgb_pixels
from featpipe.decode.probing import MAX_ASPECT, Probe, crop_corner, resized_size, to_rgb, upright
from featpipe.preprocess import Preprocessing

# JPEG draft(): the IDCT scales by 1/2, 1/4 or 1/8 while the image keeps >= DRAFT_MARGIN x the resize target, and
# the antialiased resize smooths what is left: 1.5 trades a little fidelity for speed
# (bench/README.md, "draft() margin").
DRAFT_MARGIN = 1.5
warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)  # see resize_crop
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def pil_decode(data: bytes, pre: Preprocessing) -> np.ndarray:
    """Decode one image with Pillow to a (crop, crop, 3) uint8 array; JPEGs decode at reduced size via draft()."""
    im = Image.open(io.BytesIO(data))
    if isinstance(im, JpegImagePlugin.JpegImageFile):  # (a camera's MPO too)
        tw, th = resized_size(*im.size, pre.resize)
        im.draft(None, (round(DRAFT_MARGIN * tw), round(DRAFT_MARGIN * th)))
    return resize_crop(to_rgb(upright(im)), pre)


def resize_crop(im: Image.Image, pre: Preprocessing) -> np.ndarray:
    """torchvision's Resize(shorter side) + CenterCrop, as a (crop, crop, 3) uint8 array.

    torch's antialiased uint8 resize gives Pillow's pixels (within 1) 3-6x faster on one core, and runs in the
    calling thread. A very elongated image would resize into a huge strip: Pillow then computes only the crop's
    pixels (its filter taps come from the full source, not the box)."""
    w, h = resized_size(*im.size, pre.resize)
    top, left = crop_corner(h, w, pre.crop)
    if max(im.size) > MAX_ASPECT * min(im.size):
        sx, sy = im.width / w, im.height / h
        box = (left * sx, top * sy, (left + pre.crop) * sx, (top + pre.crop) * sy)
        return np.asarray(im.resize((pre.crop, pre.crop), _RESAMPLE[pre.interpolation], box=box))
    import torch
    import torch.nn.functional as F

    # Pillow's own pixels, read-only and uncopied (pixels.py): interpolate only reads them.
    x = torch.from_numpy(rgb_pixels(im)).permute(2, 0, 1)[None]  # channels_last view: the fast uint8 kernel
    y = F.interpolate(x, size=(h, w), mode=pre.interpolation, antialias=True)[0].permute(1, 2, 0).numpy()
    out = np.empty((pre.crop, pre.crop, 3), np.uint8)
    for c in range(3):  # channel by channel: numpy's strided copy runs 4x faster with 224-long inner loops
        out[:, :, c] = y[top:top + pre.crop, left:left + pre.crop, c]
    return out


class PilDecoder:
    """Pillow in a thread pool (decode releases the GIL).

    Given `model_waiting` (extract with the model on the CPU), batches decode in the background: a second pool whose
    threads run at the lowest CPU priority decodes ahead in the moments the model leaves a core idle, instead of
    stalling its parallel regions. While the model waits for a batch, what is left of it moves to the normal pool:
    other programs busy on every core then get decoding a fair share, where idle-priority threads alone would get
    almost nothing (bench/README.md).
    """

    name = "pil"

    def __init__(self, pre: Preprocessing, threads: int | None = None,
                 model_waiting: threading.Event | None = None) -> None:
        self.pre, self.model_waiting = pre, model_waiting
        threads = threads or default_decode_threads()
        self.pool = ThreadPoolExecutor(max_workers=threads)
        self.background = ThreadPoolExecutor(max_workers=threads, initializer=lowest_priority) \
            if model_waiting else None

    def decode(self, items: list[bytes], probes: list[Probe]) -> tuple[np.ndarray, list[str | None]]:
        if self.model_waiting is None:
            return stack_results(list(self.pool.map(self.decode_one, items)), self.pre)
        return stack_results(self._decode_behind(items, self.model_waiting), self.pre)

    def _decode_behind(self, items: list[bytes], model_waiting: threading.Event) -> list:
        """Background pool first; while the model waits, images no background thread has started move to the
        normal pool, and so do any a background thread has held for STALLED_SECONDS of that wait."""
        futures = [self.background.submit(self.decode_one, d) for d in items]
        moved: set[int] = set()
        waited = 0.0
        while pending := [i for i, f in enumerate(futures) if not f.done()]:
            hurry = model_waiting.is_set()
            if hurry:
                for i in pending:
                    if i not in moved and (futures[i].cancel() or waited > STALLED_SECONDS):
                        futures[i] = self.pool.submit(self.decode_one, items[i])
                        moved.add(i)
            seconds = _wait_any([futures[i] for i in pending], POLL_SECONDS)
            waited = waited + seconds if hurry else 0.0
        return [f.result() for f in futures]

    def decode_one(self, data: bytes) -> np.ndarray | str:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return pil_decode(data, self.pre)
        except Exception as e:  # truncated / corrupt pixel data: a reason, never a crash
            return f"decode failed: {type(e).__name__}: {e}"


# How often the decode thread looks whether the model started waiting: polling every 2 ms cost more than the
# quicker reaction saved (bench/README.md, "Decode thread policy").
POLL_SECONDS = 0.02
STALLED_SECONDS = 0.05  # ~15 decode times: a background worker this slow is being starved by other programs


def _wait_any(futures: list[Future], timeout: float) -> float:
    t0 = time.perf_counter()
    wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)
    return time.perf_counter() - t0


def lowest_priority() -> None:
    """Run the calling thread (and threads it starts) only when a core would otherwise idle: SCHED_IDLE, Linux.

    Where decoding and the model share the cores, a decode thread that takes a core from one of torch's OpenMP
    threads stalls the whole parallel region; a SCHED_IDLE thread is preempted the moment a model thread wakes."""
    if sys.platform.startswith("linux"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # pid 0: this thread only
        except OSError:
            pass


def default_decode_threads() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0))))


def stack_results(results: list, pre: Preprocessing):
    """Per-image arrays (numpy, or torch rows from a GPU decoder) or skip reasons -> (batch, reasons).

    Here, not in batched.py: PilDecoder needs it, and batched.py sits above this module (it falls back to Pillow)."""
    rows = [r for r in results if not isinstance(r, str)]
    reasons = [r if isinstance(r, str) else None for r in results]
    if not rows:
        return np.empty((0, pre.crop, pre.crop, 3), np.uint8), reasons
    if all(isinstance(r, np.ndarray) for r in rows):
        return np.stack(rows), reasons
    import torch

    device = next(r.device for r in rows if isinstance(r, torch.Tensor))
    return torch.stack([torch.as_tensor(r).to(device) for r in rows]), reasons
