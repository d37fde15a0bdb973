"""Classify image files with a model bundle: embeddings -> head.

A head-only bundle's embeddings come from extract's engine and cache (the pretrained backbone whose weights sha256
the bundle records, its decoders and batching; an image embedded before costs a lookup). A bundle with its own
`backbone.safetensors` (fine-tuned, scratch) embeds here, batch by batch: Pillow decode, that backbone, the head.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from featpipe import bundle as B
from featpipe import table_out
from featpipe.dataset import as_text
from featpipe.decode import PilDecoder, decode_files
from featpipe.errors import UserError
from featpipe.feature_sets import side_by_side
from featpipe.rows import require_finite
from featpipe.shards import can_write

BATCH = 32
CACHED_BATCH = 8192  # rows read from the cache per head call


@dataclass(frozen=True)
class PredictConfig:
    model: Path
    paths: list[Path]
    top_k: int = 3
    device: str = "auto"
    weights: Path | None = None  # the local checkpoint a head-only bundle was fitted with (`--weights`)
    out: Path | None = None  # a .csv or .parquet of every prediction, written batch by batch
    cache_dir: Path = Path("cache")  # head-only bundles: the embedding cache extract uses


def predict(cfg: PredictConfig, progress: Callable[[int, int], None] | None = None) -> dict:
    """{"model", "predicted", "predictions": [{"path", "top": [{"class", "probability"}]}], "skipped": [{"path",
    "reason"}]}; with cfg.out the predictions go to that file instead, batch by batch. `progress(done, total)` as
    batches of files complete."""
    if cfg.top_k < 1:
        raise UserError(f"--top-k must be at least 1 (got {cfg.top_k})")
    if cfg.out is not None:
        table_out.check(cfg.out)
    bundle = B.load(cfg.model)
    check_weights_apply(bundle, cfg.weights)
    files = collect(cfg.paths)
    if not files:
        raise UserError(f"no images found in {', '.join(map(str, cfg.paths))}")
    batches = cached_or_not(bundle, files, cfg.cache_dir, cfg.device, cfg.weights, progress)
    found = _listed(batches, bundle.classes, cfg.top_k) if cfg.out is None else _written(batches, bundle.classes,
                                                                                          cfg.out)
    return {"model": str(bundle.path), **found}


def _listed(batches, classes: list[str], top_k: int) -> dict:
    predictions, skipped = [], []
    for proba, ok, bad in batches:
        predictions += [{"path": str(f), "top": _top(p, classes, top_k)} for f, p in zip(ok, proba)]
        skipped += bad
    return {"predicted": len(predictions), "predictions": predictions, "skipped": skipped}


def _written(batches, classes: list[str], out: Path) -> dict:
    names = ["path", "predicted", "probability", *(f"p:{c}" for c in classes)]
    n, skipped = 0, []
    with table_out.TableWriter(out, names, floats=set(names[2:])) as table:
        for proba, ok, bad in batches:
            if ok:
                table.write([[as_text(str(f)) for f in ok], [classes[i] for i in proba.argmax(1)], proba.max(1),
                             *proba.T.astype(np.float32)])
            n += len(ok)
            skipped += bad
    return {"predicted": n, "predictions": [], "skipped": skipped, "out": str(out)}


def cached_or_not(bundle: B.Bundle, files: list, cache_dir: Path, device: str, weights: Path | None, progress):
    """probability_batches' batches, the embeddings from the cache (extracting what it lacks) where `cache_dir` can
    be written; else embedded here, said on stderr (predicting must still work: only caching needs the disk)."""
    if can_write(cache_dir):
        return _cached_batches(bundle, files, cache_dir, device, weights, progress)
    print(f"featpipe: cache dir {cache_dir} is not writable: embedding without the cache", file=sys.stderr)
    return probability_batches(bundle, files, device, weights, progress)


def _cached_batches(bundle: B.Bundle, files: list, cache_dir: Path, device: str, weights: Path | None, progress):
    """As probability_batches, with the embeddings from an extract run over exactly these files (skips included):
    a fine-tuned bundle's backbone keys its own cache rows (the sha256 of its backbone.safetensors)."""
    from featpipe.extract import ExtractConfig, extract

    parts = bundle.split()
    each = [weights_for(b, weights) for b in parts]  # checked before any image is embedded with others
    runs = [extract(ExtractConfig(files=files, backbone=b.backbone, cache_dir=cache_dir, device=device,
                                  weights=w, tta=b.tta), progress) for b, w in zip(parts, each)]
    res = runs[0]
    yield np.empty((0, len(bundle.classes))), [], res.skipped
    rows = [{m.path: m.sha256 for m in r.members} for r in runs]  # every run decoded the same files
    for start in range(0, len(res.members), CACHED_BATCH):
        part = [m.path for m in res.members[start:start + CACHED_BATCH]]
        X = side_by_side([r.cache.embeddings([sha[p] for p in part]) for r, sha in zip(runs, rows)])
        require_finite(X, part)
        yield bundle.head.predict_proba(X), [Path(p) for p in part], []


def probabilities(bundle: B.Bundle, files: list[Path], device: str = "auto", weights: Path | None = None,
                  progress: Callable[[int, int], None] | None = None, precision: str = "auto",
                  ) -> tuple[np.ndarray, list[Path], list[dict]]:
    """(class probabilities of the files that decode, those files, skipped [{"path", "reason"}])."""
    return gathered(probability_batches(bundle, files, device, weights, progress, precision), len(bundle.classes))


def gathered(batches, n_classes: int) -> tuple[np.ndarray, list[Path], list[dict]]:
    """probability_batches' batches as one (probabilities, files, skipped)."""
    parts, ok, skipped = [], [], []
    for proba, good, bad in batches:
        parts.append(proba)
        ok += good
        skipped += bad
    return (np.concatenate(parts) if parts else np.empty((0, n_classes))), ok, skipped


def probability_batches(bundle: B.Bundle, files: list[Path], device: str = "auto", weights: Path | None = None,
                        progress: Callable[[int, int], None] | None = None, precision: str = "auto",
                        ) -> Iterator[tuple[np.ndarray, list[Path], list[dict]]]:
    """Per batch of BATCH files: (probabilities of those that decode, those files, the skipped ones with reasons);
    progress(done, total) before the first batch and after each."""
    progress = progress or (lambda done, total: None)
    parts = bundle.split()
    embedders = [_embedder(b, device, weights, precision) for b in parts]
    decoders = [PilDecoder(b.preprocessing) for b in parts]
    progress(0, len(files))
    for start in range(0, len(files), BATCH):
        decoded = [_decode(files[start:start + BATCH], d) for d in decoders]  # each backbone's own crop size
        _, good, reasons = decoded[0]
        X = side_by_side([e(pixels) for e, (pixels, _, _) in zip(embedders, decoded)]) if good else None
        if good:
            require_finite(X, [str(f) for f in good])
        proba = bundle.head.predict_proba(X) if good else np.empty((0, len(bundle.classes)))
        progress(min(start + BATCH, len(files)), len(files))
        yield proba, good, [{"path": str(f), "reason": r} for f, r in reasons]


def collect(paths: list[Path]) -> list[Path]:
    """Files as given, folders recursively (sorted, hidden entries skipped); a path that does not exist is an error."""
    files: list[Path] = []
    empty = []
    for p in map(Path, paths):
        if p.is_dir():
            before = len(files)
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                files += [Path(dirpath) / n for n in sorted(filenames) if not n.startswith(".")]
            empty += [p] if len(files) == before else []
        elif p.exists():
            files.append(p)
        else:
            raise UserError(f"no such file or folder: {p}")
    for p in empty if files else []:  # with no file at all, the caller's "no images found" says it
        print(f"featpipe: {p} holds no files", file=sys.stderr)
    return files


def _embedder(bundle: B.Bundle, device: str, weights: Path | None, precision: str = "auto"):
    from featpipe.embed import Embedder
    from featpipe.runtime import prepare

    dev, precision = prepare(device, precision)
    return Embedder(backbone_for(bundle, weights), dev, precision, flip=bundle.tta == "flip")


def backbone_for(bundle: B.Bundle, weights: Path | None = None):
    """The backbone whose features the bundle's head was trained on (weights_for)."""
    from featpipe.backbone import load

    return load(_spec(bundle), weights_for(bundle, weights)).model


def check_weights_apply(bundle: B.Bundle, weights: Path | None) -> None:
    """`--weights` (predict, evaluate) names one backbone's pretrained checkpoint: refused where it cannot apply."""
    if bundle.more and weights is not None:
        raise UserError(f"--weights does not apply to model bundle {bundle.path}: it reads "
                        f"{len(bundle.more) + 1} backbones' embeddings, each with its own pretrained weights")
    if bundle.finetuned and weights is not None:  # it would be ignored: backbone.safetensors holds every weight
        raise UserError(f"--weights does not apply to model bundle {bundle.path}: it is fine-tuned and carries its "
                        f"own backbone ({B.BACKBONE_FILE}); drop --weights")


def weights_for(bundle: B.Bundle, weights: Path | None) -> Path | None:
    """The weights the bundle's features come from: its own backbone.safetensors when it is fine-tuned (bundle.load
    checked its sha256), else the pretrained ones (`weights`: a local checkpoint), checked by sha256 first."""
    _spec(bundle)
    if bundle.finetuned:
        return bundle.path / B.BACKBONE_FILE
    check_weights(bundle, weights)
    return weights


def check_weights(bundle: B.Bundle, weights: Path | None) -> None:
    """The pretrained weights here are those the head was fitted on (a file's hash needs no model)."""
    from featpipe.backbone import weights_sha256

    spec = _spec(bundle)
    sha = weights_sha256(spec, weights)
    if sha != bundle.weights_sha256:
        raise UserError(f"model bundle {bundle.path} was trained on {spec.name} weights with sha256 "
                        f"{bundle.weights_sha256[:12]}…, but these are {sha[:12]}…; pass "
                        f"the checkpoint it was fitted with as --weights PATH")


def _spec(bundle: B.Bundle):
    """The registry entry the bundle names, with the preprocessing it was made with."""
    from featpipe import registry

    spec = registry.resolve(bundle.backbone)
    if spec.preprocessing != bundle.preprocessing:
        raise UserError(f"model bundle {bundle.path} was made with other preprocessing than this featpipe's "
                        f"{spec.name!r}; refit it with `featpipe fit-head`")
    return spec


def _decode(files: list[Path], decoder: PilDecoder) -> tuple[np.ndarray, list[Path], list[tuple[Path, str]]]:
    """Read, probe and Pillow-decode each file; anything unreadable becomes (path, reason), never an exception."""
    results = [r for _, r in decode_files(files, decoder)]
    ok = [f for f, r in zip(files, results) if not isinstance(r, str)]
    reasons = [(f, r) for f, r in zip(files, results) if isinstance(r, str)]
    crop = decoder.pre.crop
    rows = [r for r in results if not isinstance(r, str)]
    return (np.stack(rows) if rows else np.empty((0, crop, crop, 3), np.uint8)), ok, reasons


def _top(p: np.ndarray, classes: list[str], k: int) -> list[dict]:
    order = np.argsort(-p, kind="stable")[:k]
    return [{"class": classes[i], "probability": round(float(p[i]), 6)} for i in order]
