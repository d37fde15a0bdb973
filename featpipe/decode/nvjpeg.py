"""torchvision.io.decode_jpeg: nvJPEG on a CUDA device, libjpeg-turbo on the CPU; orientation, resize and crop
batched on the decoding device. torch is imported inside the functions: `import featpipe.decode` stays light."""

from __future__ import annotations

import contextlib
import io
import warnings

from PIL import Image

from featpipe.decode.batched import decode_batched, pixel_chunks
from featpipe.decode.pil import PilDecoder
from featpipe.decode.probing import Probe, crop_corner, resized_size
from featpipe.preprocess import Preprocessing

warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)  # decode_jpeg only reads it
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision are deprecated",
                        DeprecationWarning)  # 0.29 points to TorchCodec, which the lent GPU machines do not have

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
