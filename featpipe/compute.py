"""The local compute stage (pipeline.Compute): a decode thread runs a few batches ahead of the model, which runs
in the caller's thread. Model and decoder are built on the first batch that needs them."""

from __future__ import annotations

import queue
import threading
from typing import Iterator

from featpipe.pipeline import DONE, Computed, StageTimer
from featpipe.runtime import batch_size_for, embed_decoded, start_embedding


class LocalCompute:
    def __init__(self, cfg, spec, timer: StageTimer):  # cfg: ExtractConfig
        self.cfg, self.spec, self.timer = cfg, spec, timer
        self.batch_size = cfg.batch_size or 32  # raised to the device's default once the runtime starts
        self.embedder = None
        self.decoder_name = "none"
        self.model_waiting = threading.Event()

    def described(self) -> tuple[str, str, str]:
        if self.embedder is None:
            return "none", "none", "none"
        return self.decoder_name, str(self.embedder.device), self.embedder.precision

    def run(self, encoded: queue.Queue) -> Iterator[Computed]:
        decoded: queue.Queue = queue.Queue(maxsize=3)
        errors: list[BaseException] = []
        threading.Thread(target=self._decode, args=(encoded, decoded, errors), daemon=True).start()
        while (msg := self._next(decoded)) is not DONE:
            enc, pixels, reasons = msg
            emb = embed_decoded(self.embedder, pixels, reasons, self.timer, wait=False) if enc.items else None
            yield Computed(enc.items, emb, reasons, enc.settled)
        if errors:
            raise errors[0]

    def _next(self, decoded: queue.Queue):
        """The next decoded batch; `model_waiting` is set for as long as the model has to wait for it."""
        try:
            return decoded.get_nowait()
        except queue.Empty:
            self.model_waiting.set()
            try:
                return decoded.get()
            finally:
                self.model_waiting.clear()

    def _decode(self, encoded: queue.Queue, decoded: queue.Queue, errors: list[BaseException]) -> None:
        decoder = None
        try:
            while (enc := encoded.get()) is not DONE:
                if not enc.items:
                    decoded.put((enc, None, []))
                    continue
                if decoder is None:
                    decoder = self._start()
                with self.timer("decode"):
                    pixels, reasons = decoder.decode([it.data for it in enc.items], [it.probe for it in enc.items])
                decoded.put((enc, pixels, reasons))
        except BaseException as e:  # raised again in the model's thread
            errors.append(e)
        decoded.put(DONE)

    def _start(self):
        self.embedder, decoder = start_embedding(self.cfg, self.spec, self.timer, self.model_waiting)
        self.decoder_name = decoder.name
        self.batch_size = batch_size_for(self.cfg, self.embedder.device)
        return decoder
