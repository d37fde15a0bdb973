"""Encoded bytes -> uint8 HWC crops behind one interface: Pillow, DALI (GPU or CPU), torchvision's nvJPEG (GPU, or
libjpeg-turbo on CPU as its test twin).

Files are read once (by the reader, which also hashes them); decoders get bytes, never paths. Batched decoders
cannot skip a bad sample, so every file is probed first (`probe`) and anything they should not see (non-JPEG, CMYK,
16-bit, palette, alpha, suspected truncation) goes to Pillow. What they still reject is redone in Pillow.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from featpipe.errors import UserError, first_line
from featpipe.pixels import rgb_pixels
from featpipe.preprocess import Preprocessing

MAX_ASPECT = 16  # longer side / shorter side beyond which DALI is not given the image
# JPEG draft(): the IDCT scales by 1/2, 1/4 or 1/8 while the image keeps >= DRAFT_MARGIN x the resize target, and
# the antialiased resize smooths what is left. Per-image cosine of mobilenet_v2 embeddings to torchvision's full
# decode, worst of 300 camera-size JPEGs: margin 2: 0.9996, 1.5: 0.9950, 1: 0.9941 (shipped photos 0.9817);
# decode 188 / 244 / 318 img/s on one core (measured with Pillow's resize, before the torch resize below).
DRAFT_MARGIN = 1.5
warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)  # see resize_crop
warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)  # decode_jpeg only reads it
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision are deprecated",
                        DeprecationWarning)  # 0.29 points to TorchCodec, which the lent GPU machines do not have
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
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
        return Probe(False, f"image too large (over {Image.MAX_IMAGE_PIXELS} pixels)")
    except UnidentifiedImageError:
        return Probe(False, "not an image")
    except Exception as e:  # Pillow raises many types on malformed headers
        return Probe(False, f"unreadable image header: {e}")
    if w < 1 or h < 1:
        return Probe(False, "image has no pixels")
    orientation = _exif_orientation(im)
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    # JPEG entropy data byte-stuffs 0xFF, so a final EOI marker near the end means the scan was not cut short.
    complete = data.rfind(b"\xff\xd9") >= max(0, len(data) - 1024)
    # DALI resizes the whole image before cropping: a 1 x 20000 strip would become 256 x 5 million pixels.
    squat = max(w, h) <= MAX_ASPECT * min(w, h)
    return Probe(im.format == "JPEG" and im.mode in ("RGB", "L") and complete and squat, None, (w, h), orientation)


def _exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag, 1-8, read as exif_transpose reads it: by dict lookup, so "6" or 6.5 mean upright."""
    try:
        tag = im.getexif().get(0x0112, 1)
        return int(tag) if tag in _TRANSPOSE else 1
    except Exception:
        return 1


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


def pil_decode(data: bytes, pre: Preprocessing) -> np.ndarray:
    """Decode one image with Pillow to a (crop, crop, 3) uint8 array; JPEGs decode at reduced size via draft()."""
    im = Image.open(io.BytesIO(data))
    if im.format == "JPEG":
        tw, th = resized_size(*im.size, pre.resize)
        im.draft(None, (round(DRAFT_MARGIN * tw), round(DRAFT_MARGIN * th)))
    orientation = _exif_orientation(im)
    if orientation != 1:  # not exif_transpose: it also re-encodes the EXIF block, and fails on some it cannot write
        im = im.transpose(_TRANSPOSE[orientation])
    return resize_crop(to_rgb(im), pre)


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


def crop_corner(h: int, w: int, crop: int) -> tuple[int, int]:
    """torchvision's CenterCrop corner (Python's round: half to even)."""
    return int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))


class Decoder(Protocol):
    name: str

    def decode(self, items: list[bytes], probes: list[Probe]) -> tuple[np.ndarray | "torch.Tensor", list[str | None]]:
        """Return a (N_ok, crop, crop, 3) uint8 batch and, per input, None (decoded) or a skip reason."""


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


# How often the decode thread looks whether the model started waiting. Polling every 2 ms cost more than the
# quicker reaction saved: extract/forward 0.763 vs 0.785 at 20 ms, idle machine; 36 vs 46 img/s with 2 CPU hogs.
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


def stack_results(results: list, pre: Preprocessing):
    """Per-image arrays (numpy, or torch rows from a GPU decoder) or skip reasons -> (batch, reasons)."""
    rows = [r for r in results if not isinstance(r, str)]
    reasons = [r if isinstance(r, str) else None for r in results]
    if not rows:
        return np.empty((0, pre.crop, pre.crop, 3), np.uint8), reasons
    if all(isinstance(r, np.ndarray) for r in rows):
        return np.stack(rows), reasons
    import torch

    device = next(r.device for r in rows if isinstance(r, torch.Tensor))
    return torch.stack([torch.as_tensor(r).to(device) for r in rows]), reasons


class DaliDecoder:
    """DALI external-source pipeline: nvJPEG (`mixed`) when device_id is an int, libjpeg-turbo when None."""

    def __init__(self, pre: Preprocessing, batch_size: int, device_id: int | None, threads: int | None = None):
        self.pre, self.batch_size, self.device_id = pre, batch_size, device_id
        self.threads = threads or default_decode_threads()
        self.name = "dali-gpu" if device_id is not None else "dali-cpu"
        self.fallback = PilDecoder(pre, self.threads)
        self.pipe = self._build()

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        interp = types.INTERP_CUBIC if self.pre.interpolation == "bicubic" else types.INTERP_LINEAR
        gpu = self.device_id is not None

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, device_id=self.device_id,
                      prefetch_queue_depth=1, exec_dynamic=True)
        def pipe():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
            start = fn.external_source(name="start", dtype=types.INT32, ndim=1)
            # fancy upsampling: nvJPEG then matches libjpeg-turbo (DALI CPU) and Pillow chroma upsampling
            img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                    jpeg_fancy_upsampling=True)
            img = fn.resize(img, size=size, interp_type=interp, antialias=True)
            return fn.slice(img, start=start, shape=[self.pre.crop, self.pre.crop], axis_names="HW")

        p = pipe()
        p.build()
        return p

    def decode(self, items: list[bytes], probes: list[Probe]):
        return decode_batched(self._run_dali, items, probes, self.fallback)

    def _run_dali(self, data: list[bytes], probes: list[Probe]):
        """The pipeline's batch size is a maximum: longer inputs run in chunks (else DALI fails the whole batch)."""
        sizes = [p.size for p in probes]
        chunks = [self._run_chunk(data[i:i + self.batch_size], sizes[i:i + self.batch_size])
                  for i in range(0, len(data), self.batch_size)]
        if any(c is None for c in chunks):
            return None
        if len(chunks) == 1:
            return chunks[0]
        if self.device_id is None:
            return np.concatenate(chunks)
        import torch

        return torch.cat(chunks)

    def _run_chunk(self, data: list[bytes], sizes: list[tuple[int, int]]):
        # Sizes and crop corners follow torchvision's rules exactly (DALI's own round the other way).
        hw = [resized_size(w, h, self.pre.resize)[::-1] for w, h in sizes]
        try:
            self.pipe.feed_input("enc", [np.frombuffer(d, dtype=np.uint8) for d in data])
            self.pipe.feed_input("size", [np.array(s, dtype=np.float32) for s in hw])
            self.pipe.feed_input("start", [np.array(crop_corner(*s, self.pre.crop), dtype=np.int32) for s in hw])
            (tl,) = self.pipe.run()
            return self._to_host_or_torch(tl)
        except RuntimeError:
            self.pipe = self._build()  # a failed run can leave the pipeline unusable
            return None

    def _to_host_or_torch(self, tl):
        if self.device_id is None:
            return np.array(tl.as_array())
        import torch
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = tl.as_tensor()
        t = torch.empty(dense.shape(), dtype=torch.uint8, device=f"cuda:{self.device_id}")
        feed_ndarray(dense, t, cuda_stream=torch.cuda.current_stream(self.device_id))
        return t


def decode_batched(run: Callable, items: list[bytes], probes: list[Probe], fallback: PilDecoder):
    """A batched decoder's `run(data, probes)` for the probed-safe JPEGs, Pillow for the rest and for what it
    rejected; merged back in input order. `run` returns a batch, a list of rows with None where it failed, or None
    (all failed)."""
    fast = [i for i, p in enumerate(probes) if p.batch_ok]
    batch = run([items[i] for i in fast], [probes[i] for i in fast]) if fast else None
    if batch is not None and not isinstance(batch, list) and len(fast) == len(items):
        return batch, [None] * len(items)
    results: list = [None] * len(items)
    for k, i in enumerate(fast if batch is not None else []):
        results[i] = batch[k]
    slow = [i for i, r in enumerate(results) if r is None]
    for i, r in zip(slow, fallback.pool.map(fallback.decode_one, [items[i] for i in slow])):
        results[i] = r
    return stack_results(results, fallback.pre)


# Decoded pixels per nvJPEG call: bounds GPU memory (uint8 images, then float during the resize) for large photos.
CHUNK_PIXELS = 1 << 27
# EXIF orientation -> flips after a transpose (5-8) or alone (1-4): what ImageOps.exif_transpose does.
_FLIPS = {1: (), 2: (2,), 3: (1, 2), 4: (1,), 5: (), 6: (2,), 7: (1, 2), 8: (1,)}


class TorchvisionDecoder:
    """torchvision.io.decode_jpeg: nvJPEG on a CUDA device, batched, with no DALI to install (the lent GPU machines
    cannot take DALI's 476 MB wheel); on the CPU the same code runs libjpeg-turbo, its twin for tests. Orientation,
    resize and crop run on the decoding device, one batched resize per distinct image size.

    On CUDA it works on a stream of its own. nvJPEG allocates its output on the caller's stream but writes it from
    a private one that waits for nothing (decode_jpegs_cuda in torchvision's source): memory freed by work still
    queued, such as the last batch's forward pass, would be overwritten under it. So decoding waits for this side
    stream's own work, never the model's, and the crops handed over are marked as used by the model's stream."""

    def __init__(self, pre: Preprocessing, device_id: int | None, threads: int | None = None) -> None:
        import torch

        self.pre = pre
        self.device = torch.device("cpu" if device_id is None else f"cuda:{device_id}")
        self.name = "torchvision-cpu" if device_id is None else "torchvision-gpu"
        self.stream = torch.cuda.Stream(self.device) if device_id is not None else None
        self.fallback = PilDecoder(pre, threads)
        buf = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buf, "JPEG")
        with self._side_stream():
            self._decode([buf.getvalue()])  # raises here (make_decoder falls back) if this build cannot decode there

    def decode(self, items: list[bytes], probes: list[Probe]):
        return decode_batched(self._run, items, probes, self.fallback)

    def _side_stream(self):
        import torch

        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _decode(self, data: list[bytes]) -> list:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        if self.stream is not None:
            self.stream.synchronize()  # what this stream freed is idle before nvJPEG may write into it
        return decode_jpeg([torch.frombuffer(d, dtype=torch.uint8) for d in data], mode=ImageReadMode.RGB,
                           device=self.device)

    def _run(self, data: list[bytes], probes: list[Probe]):
        import torch

        with self._side_stream():
            out = torch.empty((len(data), self.pre.crop, self.pre.crop, 3), dtype=torch.uint8, device=self.device)
            failed = {i for chunk in pixel_chunks([p.size for p in probes], CHUNK_PIXELS)
                      for i in self._fill(out, chunk, data, probes)}
        if self.stream is not None:
            model_stream = torch.cuda.default_stream(self.device)  # extract's threads never set a stream of their own
            model_stream.wait_stream(self.stream)
            out.record_stream(model_stream)  # freed later: not reused by this stream before the model has read it
        batch = out if self.stream is not None else out.numpy()
        return [None if i in failed else batch[i] for i in range(len(data))] if failed else batch

    def _fill(self, out, chunk: list[int], data: list[bytes], probes: list[Probe]) -> list[int]:
        """Decode one chunk into its rows of `out`, one resize per distinct size; return the rows nvJPEG failed."""
        import torch

        by_shape: dict[tuple, list] = {}
        failed = []
        for i, im in zip(chunk, self._decode_chunk([data[i] for i in chunk])):
            if im is None:
                failed.append(i)
                continue
            im = orient(im, probes[i].orientation)
            by_shape.setdefault(tuple(im.shape), []).append((i, im))
        for group in by_shape.values():
            rows = torch.tensor([i for i, _ in group], device=self.device)
            out[rows] = resize_crop_batch(torch.stack([im for _, im in group]), self.pre)
        return failed

    def _decode_chunk(self, data: list[bytes]) -> list:
        """nvJPEG returns no partial results: after a failed call each image is retried alone (None: failed), so one
        bad file sends itself to Pillow, not the whole batch."""
        try:
            return self._decode(data)
        except RuntimeError:
            pass
        images: list = []
        for d in data:
            try:
                images += self._decode([d])
            except RuntimeError:
                images.append(None)
        return images


def pixel_chunks(sizes: list[tuple[int, int]], budget: int) -> list[list[int]]:
    """Consecutive index runs whose width x height sums stay within budget (an image larger than it runs alone)."""
    chunks: list[list[int]] = [[]]
    total = 0
    for i, (w, h) in enumerate(sizes):
        if chunks[-1] and total + w * h > budget:
            chunks.append([])
            total = 0
        chunks[-1].append(i)
        total += w * h
    return chunks


def orient(x: "torch.Tensor", orientation: int) -> "torch.Tensor":
    """A (C, H, W) image as its EXIF orientation tag says it should be shown (transpose: a view; flip: a copy)."""
    if orientation >= 5:
        x = x.transpose(1, 2)
    return x.flip(_FLIPS[orientation]) if _FLIPS[orientation] else x


def resize_crop_batch(x: "torch.Tensor", pre: Preprocessing) -> "torch.Tensor":
    """(N, 3, H, W) uint8 of one size -> (N, crop, crop, 3) uint8: resize_crop's rule, antialiased, on x's device
    (float: CUDA has no uint8 antialiased kernel)."""
    import torch.nn.functional as F

    w, h = resized_size(x.shape[3], x.shape[2], pre.resize)
    top, left = crop_corner(h, w, pre.crop)
    y = F.interpolate(x.float(), size=(h, w), mode=pre.interpolation, antialias=True)
    y = y[:, :, top:top + pre.crop, left:left + pre.crop]
    return y.round_().clamp_(0, 255).to(x.dtype).permute(0, 2, 3, 1)


def default_decode_threads() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0))))


def make_decoder(kind: str, pre: Preprocessing, batch_size: int, cuda_device: int | None,
                 model_waiting: threading.Event | None = None) -> Decoder:
    """`auto`: nvJPEG when the model runs on CUDA, through DALI, else through torchvision (where DALI does not import
    or build), else Pillow; without CUDA, Pillow.

    Without a GPU, Pillow beats DALI's CPU pipeline: draft() scales JPEGs in the IDCT, which DALI's CPU decoder
    cannot, so it spends less of the cores the model needs (bench/README.md has the side-by-side numbers).
    `model_waiting`: a Pillow decoder decodes in the background (PilDecoder)."""
    if kind == "pil" or (kind == "auto" and cuda_device is None):
        return PilDecoder(pre, model_waiting=model_waiting)
    build = {"dali": lambda: DaliDecoder(pre, batch_size, cuda_device),
             "torchvision": lambda: TorchvisionDecoder(pre, cuda_device)}
    for name in build if kind == "auto" else [kind]:
        try:
            return build[name]()
        except Exception as e:
            if kind != "auto":
                raise UserError(f"{name} decoder unavailable: {type(e).__name__}: {first_line(e)}") from None
    return PilDecoder(pre, model_waiting=model_waiting)
