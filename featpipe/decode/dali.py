"""DaliDecoder: DALI's pipeline behind the Decoder interface. nvidia.dali is imported only when one is built, so
`import featpipe.decode` does not load it."""

from __future__ import annotations

import numpy as np

from featpipe.decode.batched import decode_batched
from featpipe.decode.pil import PilDecoder, default_decode_threads
from featpipe.decode.probing import Probe, crop_corner, resized_size
from featpipe.preprocess import Preprocessing


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
