"""The training set as files, decoded a batch at a time while the batch before it trains: memory does not grow with
the number of images (a decoded set of 100,000 images at 256 px would need ~19 GiB).

Training batches are uint8 squares of side `resize` (the shorter side the backbone's preprocessing resizes to),
augmented on tensors; validation images are decoded with the backbone's own preprocessing, the extractor's exact
pixels, so fine-tune, scratch and the cached-feature head are scored on identical inputs. Every method uses
featpipe.splits.val_split on the same path-sorted list: the same images."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from featpipe import registry
from featpipe.decode import default_decode_threads, make_decoder, probe_files, read_probed
from featpipe.errors import UserError
from featpipe.features import find_duplicates
from featpipe.preprocess import Preprocessing
from featpipe.splits import Split, content_groups, split_column, val_split

PREFETCH = 2  # batches decoding ahead of the one in use: hides decoding behind a step, memory stays bounded


@dataclass
class Images:
    """The training set: paths, labels, content groups (identical files share one, and one side of the split), the
    shared split, and the backbone's preprocessing. Nothing decoded is held."""

    paths: list[str]
    y: np.ndarray
    classes: list[str]
    groups: np.ndarray
    split: Split
    pre: Preprocessing
    prepare_seconds: float  # listing and checking the files (scratch), or 0 when the cache vouched for them
    content: str  # sha256 over every (absolute path, label, content hash): what a resumed run must find again
    validation: str  # which images validate, as reports say it (held_out.Arranged.validation)
    decoder: str = "auto"  # decode.make_decoder's kind: Pillow on the CPU, nvJPEG when `cuda` names a GPU
    cuda: int | None = None  # the GPU training runs on (set by train once the device is known)

    @property
    def crop(self) -> int:
        return self.pre.crop

    def squares(self, idx: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Training pixels in idx's order: (indices, uint8 (B, resize, resize, 3)); a file that no longer decodes
        is left out and named on stderr."""
        pre = self.pre
        square = Preprocessing(pre.resize, pre.resize, pre.mean, pre.std, pre.interpolation)
        return stream(self.paths, idx, batch_size, square, False, self.decoder, self.cuda)

    def crops(self, idx: np.ndarray, batch_size: int = 64) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Evaluation pixels (the extractor's preprocessing) in idx's order; a file that no longer decodes is an
        error: the scores would silently be on fewer images."""
        return stream(self.paths, idx, batch_size, self.pre, True, self.decoder, self.cuda)


def stream(paths: list[str], idx: np.ndarray, batch_size: int, pre: Preprocessing, strict: bool,
           decoder: str = "pil", cuda: int | None = None) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(indices, uint8 batch) in idx's order. A background thread prepares PREFETCH batches ahead: the files read
    and probed on a pool, then one batched decode (decode.make_decoder: Pillow's threads, or nvJPEG on the GPU with
    `cuda`, its pixels staying there)."""
    dec = make_decoder(decoder, pre, batch_size, cuda)
    parts = [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    reads, ahead = ThreadPoolExecutor(default_decode_threads()), ThreadPoolExecutor(1)

    def batch(part: np.ndarray) -> tuple:
        got = list(reads.map(lambda i: read_probed(paths[i]), part))
        ok = [j for j, (_, _, why) in enumerate(got) if why is None]
        pixels, reasons = dec.decode([got[j][0] for j in ok], [got[j][1] for j in ok]) if ok else (None, [])
        why = [g[2] for g in got]
        for j, reason in zip(ok, reasons):
            why[j] = reason
        return pixels, why

    queued = deque(ahead.submit(batch, part) for part in parts[:PREFETCH])
    try:
        for k, part in enumerate(parts):
            pixels, why = queued.popleft().result()
            if k + PREFETCH < len(parts):
                queued.append(ahead.submit(batch, parts[k + PREFETCH]))
            for j in (j for j, w in enumerate(why) if w):
                if strict:
                    raise UserError(f"{paths[part[j]]} no longer decodes ({why[j]}); it was usable when the run "
                                    f"started: restore it or rerun")
                print(f"skipped {paths[part[j]]}: {why[j]}", file=sys.stderr)
            good = [j for j, w in enumerate(why) if not w]
            if good:
                yield part[good], torch.as_tensor(pixels)
    finally:
        ahead.shutdown(wait=False, cancel_futures=True)
        reads.shutdown(wait=False, cancel_futures=True)


def split_images(paths: list[str], y: np.ndarray, classes: list[str], digests: list[str], groups: np.ndarray,
                 pre: Preprocessing, val_fraction: float, seed: int, prepare_seconds: float = 0.0,
                 given: tuple[Split, str] | None = None) -> Images:
    """The random stratified split (identical files on one side), or `given`: (a split, what it is)."""
    split, validation = given or (val_split(y, classes, val_fraction, seed, zero_ok=False, groups=groups),
                                  f"random {val_fraction:g} split")
    y = np.asarray(y, dtype=np.int64)
    content = hashlib.sha256()
    for path, label, digest in zip(paths, y.tolist(), digests):
        content.update(f"{os.path.abspath(path)}\0{classes[label]}\0{digest}\n".encode("utf-8", "surrogateescape"))
    return Images(paths=list(paths), y=y, classes=classes, groups=groups, split=split, pre=pre,
                  prepare_seconds=round(prepare_seconds, 4), content=content.hexdigest(), validation=validation)


def scan_images(data_dir: Path | None, backbone: str, val_fraction: float, seed: int,
                labels: Path | None = None) -> Images:
    """The data dir's images (class folders, or the rows of `labels`) in path order, as featpipe.features orders its
    rows (same split). Each file is read, hashed and decoded once; files that do not decode are skipped and
    listed. A split column in `labels` gives the split; its test rows are left out, said on stderr."""
    from featpipe.dataset import require_every_class
    from featpipe.manifest import labelled_files

    t0 = time.perf_counter()
    root, listed = labelled_files(data_dir, labels)
    files, classes, splits = listed.files, listed.classes, listed.splits
    if any(v == "test" for v in splits.values()):
        print(f"featpipe: the test rows of {labels} are left out here (`featpipe experiment --labels` scores them)",
              file=sys.stderr)
    files = sorted((f for f in files if splits.get(f.path) != "test"), key=lambda f: f.path)
    if not files:
        raise UserError(f"the split column of {labels} has only test rows: nothing to train on")
    pre = registry.resolve(backbone).preprocessing
    checked = probe_files([f.path for f in files], pre=pre)  # decoded once: validation errors on a file that fails
    for f, (_, why) in zip(files, checked):
        if why:
            print(f"skipped {f.path}: {why}", file=sys.stderr)
    keep = [i for i, (_, why) in enumerate(checked) if not why]
    if not keep:
        raise UserError("no decodable image to train on")
    paths = [files[i].path for i in keep]
    names = [files[i].label for i in keep]
    y = np.array([classes.index(label) for label in names], dtype=np.int64)
    given = _given(paths, y, classes, splits, labels) if splits else None  # before: its message names the class
    require_every_class(root, classes, set(names))
    digests = [checked[i][0] for i in keep]
    groups = content_groups(digests)
    find_duplicates(paths, names, groups).report()
    return split_images(paths, y, classes, digests, groups, pre, val_fraction, seed, time.perf_counter() - t0, given)


def _given(paths: list[str], y: np.ndarray, classes: list[str], splits: dict[str, str],
           labels: Path) -> tuple[Split, str]:
    _, split = split_column(np.array([splits[p] for p in paths]), y, classes)
    if not len(split.val):
        raise UserError(f"training stops early on validation accuracy, and the split column of {labels} gives no "
                        f"validation image")
    return split, f"split column of {labels}"
