"""The training images in memory: each file decoded once, through the extractor's Pillow path, into a uint8 square
of side `resize` (the shorter side the backbone's preprocessing resizes to); each training batch is augmented on
tensors, so an epoch costs only the network. Validation images are decoded once more with the backbone's own
preprocessing: the extractor's exact pixels, so fine-tune, scratch and the cached-feature head are scored on
identical inputs. Every method uses featpipe.splits.val_split on the same path-sorted list: the same images."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featpipe import registry
from featpipe.decode import PilDecoder, decode_files
from featpipe.errors import UserError
from featpipe.features import find_duplicates
from featpipe.preprocess import Preprocessing
from featpipe.splits import Split, content_groups, val_split


@dataclass
class Images:
    """The decoded training set: uint8 (N, S, S, 3) squares, labels, the shared split, and the val crops."""

    pixels: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    paths: list[str]
    groups: np.ndarray  # featpipe.splits content groups: identical files share one, and one side of the split
    split: Split
    crop: int
    val_pixels: torch.Tensor  # uint8 (len(split.val), crop, crop, 3): the extractor's preprocessing exactly
    decode_seconds: float


def decode_images(paths: list[str], labels: np.ndarray, classes: list[str], pre: Preprocessing,
                  val_fraction: float, seed: int) -> Images:
    """Decode each file once at (resize x resize); files Pillow cannot decode are dropped (reported on stderr)."""
    t0 = time.perf_counter()
    square = Preprocessing(pre.resize, pre.resize, pre.mean, pre.std, pre.interpolation)
    decoder = PilDecoder(square)
    results = decode_files(paths, decoder)
    keep = [i for i, (_, r) in enumerate(results) if not isinstance(r, str)]
    for p, (_, r) in zip(paths, results):
        if isinstance(r, str):
            print(f"skipped {p}: {r}", file=sys.stderr)
    if not keep:
        raise UserError("no decodable image to train on")
    y = labels[keep]
    groups = content_groups([results[i][0] for i in keep])
    split = val_split(y, classes, val_fraction, seed, zero_ok=False, groups=groups)
    pixels = torch.from_numpy(np.stack([results[i][1] for i in keep]))
    kept = [paths[i] for i in keep]
    val = [r for _, r in decode_files([kept[i] for i in split.val], PilDecoder(pre))]
    if any(isinstance(v, str) for v in val):
        raise UserError(f"a validation image changed while decoding: {next(v for v in val if isinstance(v, str))}")
    return Images(pixels=pixels, y=torch.from_numpy(y), classes=classes, paths=kept, groups=groups, split=split,
                  crop=pre.crop, val_pixels=torch.from_numpy(np.stack(val)).reshape(-1, pre.crop, pre.crop, 3),
                  decode_seconds=round(time.perf_counter() - t0, 4))


def scan_images(data_dir: Path | None, backbone: str, val_fraction: float, seed: int) -> Images:
    """The data dir's decodable images in path order, as featpipe.features orders its rows (same split)."""
    from featpipe.dataset import require_every_class, scan

    root, files, classes = scan(data_dir)
    files = sorted(files, key=lambda f: str(f.path))
    labels = np.array([classes.index(f.label) for f in files], dtype=np.int64)
    images = decode_images([str(f.path) for f in files], labels, classes,
                           registry.resolve(backbone).preprocessing, val_fraction, seed)
    require_every_class(root, classes, {classes[i] for i in images.y.tolist()})
    find_duplicates(images.paths, [classes[i] for i in images.y.tolist()], images.groups).report()
    return images
