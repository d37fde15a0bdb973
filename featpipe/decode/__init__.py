"""Encoded bytes -> uint8 HWC crops behind one interface: Pillow, DALI (GPU or CPU), torchvision's nvJPEG (GPU, or
libjpeg-turbo on CPU as its test twin).

Files are read once (by the reader, which also hashes them); decoders get bytes, never paths. Batched decoders
cannot skip a bad sample, so every file is probed first (`probe`) and anything they should not see (non-JPEG, CMYK,
16-bit, palette, alpha, suspected truncation) goes to Pillow. What they still reject is redone in Pillow.

probing.py: what a file is (header, size, orientation); pil.py: Pillow and its thread pools; batched.py: the Decoder
interface and the Pillow fallback batched decoders share; dali.py, nvjpeg.py: the batched decoders. torch and DALI
are imported only where a decoder uses them, so importing this package loads neither.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence

import numpy as np

from featpipe.dataset import ImageFile, read_file
from featpipe.decode.batched import Decoder
from featpipe.decode.dali import DaliDecoder
from featpipe.decode.nvjpeg import TorchvisionDecoder
from featpipe.decode.pil import DRAFT_MARGIN, PilDecoder, default_decode_threads, pil_decode, resize_crop
from featpipe.decode.probing import Probe, crop_corner, probe, to_rgb
from featpipe.errors import UserError, first_line
from featpipe.preprocess import Preprocessing

__all__ = ["DRAFT_MARGIN", "DaliDecoder", "Decoder", "PilDecoder", "Probe", "TorchvisionDecoder", "crop_corner",
           "decode_files", "default_decode_threads", "make_decoder", "pil_decode", "probe", "probe_files",
           "read_probed", "resize_crop", "to_rgb"]
PROBE_CHUNK = 4096  # files per Executor.map call: bounded futures at any list length


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


def decode_files(paths: Sequence[str | os.PathLike], decoder: PilDecoder) -> list[tuple[str, np.ndarray | str]]:
    """Per path, in input order: (sha256 of its bytes, its (crop, crop, 3) uint8 image or why not: unreadable, not
    an image, too large, corrupt); never an exception. Read, probe and decode run on `decoder`'s thread pool.
    The sha256 ("" when the file could not be read) lets callers group identical files, as the cache's row key does."""
    def one(path) -> tuple[str, np.ndarray | str]:
        data, _, why = read_probed(path)
        return ("", why) if data is None else (hashlib.sha256(data).hexdigest(), why or decoder.decode_one(data))

    return list(decoder.pool.map(one, paths))


def read_probed(path: str | os.PathLike) -> tuple[bytes | None, Probe | None, str | None]:
    """A file's bytes (None if unreadable) and header probe, and why it cannot be decoded (None: it may be)."""
    data, err = read_file(ImageFile(os.fspath(path), ""))
    if err:
        return None, None, err
    found = probe(data)
    return data, found, found.skip_reason


def probe_files(paths: Sequence[str | os.PathLike], threads: int | None = None, pre: Preprocessing | None = None,
                ) -> list[tuple[str, str | None]]:
    """Per path, in input order: (sha256 of its bytes, why it is no image or None), from its bytes and header
    alone, or with `pre` also decoded as `pre` decodes it (a truncated JPEG has a good header): decode_files'
    checks without keeping pixels, for sets too large to hold decoded."""
    dec = None if pre is None else PilDecoder(pre, threads=1)  # its decode_one, on this function's threads

    def one(path) -> tuple[str, str | None]:
        data, _, why = read_probed(path)
        if dec is not None and data is not None and why is None and isinstance(got := dec.decode_one(data), str):
            why = got
        return ("" if data is None else hashlib.sha256(data).hexdigest()), why

    out: list[tuple[str, str | None]] = []
    with ThreadPoolExecutor(threads or default_decode_threads()) as pool:
        for start in range(0, len(paths), PROBE_CHUNK):
            out += pool.map(one, paths[start:start + PROBE_CHUNK])
    return out
