"""What every decoder offers (Decoder), and what the batched ones (DALI, nvJPEG) share: they cannot skip a bad
sample, so they get only the files `probe` passed, Pillow decodes the rest and whatever they still reject."""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from featpipe.decode.pil import PilDecoder, stack_results
from featpipe.decode.probing import Probe


class Decoder(Protocol):
    name: str

    def decode(self, items: list[bytes], probes: list[Probe]) -> tuple[np.ndarray | "torch.Tensor", list[str | None]]:
        """Return a (N_ok, crop, crop, 3) uint8 batch and, per input, None (decoded) or a skip reason."""


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
