"""`featpipe extract`: scan the data dir (or list WebDataset shards: tar_input.py), open the cache for the backbone's
key, let the engine (engine.py with compute.py, or ray_data.py on Ray Data) journal the rows the cache lacks,
publish them as a shard, and say what the data dir holds now."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

from featpipe import registry
from featpipe import weights as W
from featpipe.cache import Cache
from featpipe.shards import CacheKey
from featpipe.dataset import ImageFile, describe, empty_classes, scan, shipped_dataset
from featpipe.engine import Engine, Shards, decoders_version, user_error_if_disk_fails
from featpipe.errors import UserError
from featpipe.fileindex import FileIndex
from featpipe.hardware import cpu_has_bf16, may_have_gpu
from featpipe.manifest import Manifest, read as read_manifest
from featpipe.members import Members
from featpipe.pipeline import StageTimer
from featpipe.tar_input import expand, is_shard

DEFAULT_CACHE_DIR = Path("cache")
DEVICES = ("auto", "cpu", "cuda")
DECODERS = ("auto", "dali", "torchvision", "pil")
PRECISIONS = ("auto", "fp32", "bf16")
ENGINES = ("local", "ray")
TTA = ("none", "flip")


@dataclass
class ExtractConfig:
    data_dir: Path | None = None
    backbone: str = "mobilenet_v2"
    cache_dir: Path = DEFAULT_CACHE_DIR
    device: str = "auto"
    decoder: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    weights: Path | None = None
    engine: str = "local"
    ray_address: str | None = None  # --engine ray: join this cluster instead of starting a local Ray
    workers: int | None = None  # --engine ray: embedding actors (default: one per GPU, else one per CPU)
    labels: Path | None = None  # a CSV/Parquet of paths and labels (manifest.py) instead of class folders
    files: list[Path] | None = None  # these files, unlabelled, instead of a data dir (predict); none may decode
    shards: list[str] | None = None  # WebDataset .tar shards (paths, brace patterns, globs) instead of a data dir
    labelled: bool = False  # for training: a class without a usable image, or a sample without a label, is refused
    tta: str = "none"  # "flip": each embedding averaged with its mirror image's, cached under its own key

    def __post_init__(self) -> None:
        for flag, value, allowed in (("--device", self.device, DEVICES), ("--decoder", self.decoder, DECODERS),
                                     ("--precision", self.precision, PRECISIONS), ("--engine", self.engine, ENGINES),
                                     ("--tta", self.tta, TTA)):
            if value not in allowed:
                raise UserError(f"{flag} must be one of {', '.join(allowed)} (got {value!r})")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        if self.workers is not None and self.workers < 1:
            raise UserError("--workers must be at least 1")
        if self.engine != "ray" and (self.ray_address is not None or self.workers is not None):
            raise UserError("--ray-address and --workers need --engine ray")
        if self.labels is not None and shard_patterns(self):
            raise UserError("--labels lists a data dir's files: shards carry their labels in cls or json members")
        if self.device == "cuda" and self.engine == "local":  # now, not only once an image needs the model
            from featpipe.embed import resolve_device

            resolve_device(self.device)


@dataclass
class ExtractResult:
    images: int
    computed: int
    reused: int
    skipped: list[dict]
    seconds: float
    images_per_sec: float
    cache_file: str
    backbone: str
    dim: int
    decoder: str
    device: str
    precision: str
    stage_seconds: dict = field(default_factory=dict)
    data_dir: str = ""  # featpipe.dataset.describe: the absolute path, or shipped:<name>
    members: Members = field(default_factory=Members, repr=False)  # this run's images, in scan order
    cache: Cache | None = field(default=None, repr=False)  # where the members' rows are (its key, no weights hashing)
    splits: dict[str, str] = field(default_factory=dict, repr=False)  # --labels' split column: path -> split

    def to_json(self) -> dict:
        """The --json object: every field but the per-image members and the cache (no deep copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("members", "cache", "splits")}


def shard_patterns(cfg: ExtractConfig) -> list[str] | None:
    """The WebDataset shards asked for: cfg.shards, or a data dir that names .tar files (one argument of fit-head,
    export-embeddings, audit); None for a folder."""
    if cfg.shards:
        return cfg.shards
    return [str(cfg.data_dir)] if cfg.data_dir is not None and is_shard(cfg.data_dir) else None


def described(cfg: ExtractConfig) -> str:
    """The input as results and bundles record it: dataset.describe's, or each shard pattern's absolute path."""
    patterns = shard_patterns(cfg)
    return " ".join(describe(Path(p)) for p in patterns) if patterns else describe(cfg.data_dir)


def _weights_sha256(spec: registry.BackboneSpec, weights: Path | None) -> str:
    """A weights file hashes without torch; only a model that must be loaded to be hashed imports it."""
    known = W.known_sha256(spec, weights)
    if known is not None:
        return known
    from featpipe.backbone import weights_sha256

    return weights_sha256(spec)


def key_precision(cfg: ExtractConfig) -> str:
    """The rows' precision, settled before any image needs the model (it names the cache): torch is imported
    only where a GPU may be there to ask about."""
    if cfg.precision != "auto":
        return cfg.precision
    if cfg.device == "cpu" or (cfg.device == "auto" and not may_have_gpu()):
        return "bf16" if cpu_has_bf16() else "fp32"
    from featpipe.embed import resolve_device, resolve_precision

    return resolve_precision("auto", resolve_device(cfg.device))


def extract(cfg: ExtractConfig, progress: Callable[[int, int | None], None] | None = None) -> ExtractResult:
    """Make sure every image under cfg.data_dir has a row in the cache; compute only what is missing."""
    t0 = time.perf_counter()
    spec = registry.resolve(cfg.backbone)
    root, files, classes, listed = _inputs(cfg)
    cfg = replace(cfg, precision=key_precision(cfg))
    key = CacheKey(spec.name, _weights_sha256(spec, cfg.weights), spec.preprocessing, spec.dim, cfg.precision,
                   cfg.tta)
    cache = Cache(cfg.cache_dir, key)
    timer = StageTimer()
    with cache:
        shards = isinstance(files, Shards)  # their members' records are kept per shard, not under root
        whole = None if shards or cfg.files is not None else root  # a folder gone through: its gone files' records go
        index = FileIndex(cfg.cache_dir, whole, decoders_version(cfg.decoder), cache.writable)
        engine = _engine(cfg, spec, key, timer, index)
        known = cache.hashes()
        computed, skipped = engine.run(files, known, cache, progress)
        skipped = sorted(skipped + listed.skipped_rows(), key=lambda s: s["path"]) if listed else skipped
        with timer("commit"), user_error_if_disk_fails(cache.path):
            cache.publish()
        if cache.writable:  # root could write a 555 dir: the mode means read-only to featpipe too
            index.save()
    members = engine.members.where(  # cached before this run, or computed by it (not: failed to decode)
        lambda sha: sha in computed or (sha in known and sha not in engine.first_copy))
    _check_members(cfg, root, classes, members, skipped, shards)  # after the cache is saved
    seconds = time.perf_counter() - t0
    decoder, device, precision = engine.described()
    images = engine.inputs + len(listed.skipped if listed else ())  # a skipped --labels row is an input too
    return ExtractResult(
        images=images, computed=len(computed), reused=engine.reused_files, skipped=skipped, seconds=round(seconds, 4),
        images_per_sec=round(images / seconds, 2) if seconds > 0 else 0.0, cache_file=str(cache.path),
        backbone=spec.name, dim=spec.dim, decoder=decoder, device=device, precision=precision,
        stage_seconds=timer.totals(), data_dir=described(cfg),
        members=members, cache=cache, splits=listed.splits if listed else {},
    )


def _check_members(cfg: ExtractConfig, root: Path, classes: list[str], members: Members, skipped: list[dict],
                   shards: bool) -> None:
    """Nothing usable at all is one line, exit 2; so is, for training, a class without a usable image or a sample
    without a label. Embedding alone notes the empty class: the other classes' rows are as good."""
    if not members and cfg.files is None:
        what = "sample" if shards else "file"
        if not skipped:
            raise UserError(f"no valid image in {root}: no {what} to embed")
        tars = not shards and all(is_shard(s["path"]) for s in skipped)  # a folder of shards given as a data dir
        raise UserError(f"no valid image in {root}; {len(skipped)} {what}(s) skipped, e.g. "
                        f"{Path(skipped[0]['path']).name}: {skipped[0]['reason']}"
                        + (f" (WebDataset shards? pass them as '{root}/*.tar')" if tars else ""))
    empty = empty_classes(root, classes, {f.label for f in members.files}, skipped)
    if empty and cfg.labelled:
        raise UserError(empty)
    if empty:
        print(f"featpipe: {empty}", file=sys.stderr)
    if cfg.labelled:
        _require_sample_labels(members)


def _require_sample_labels(members: Members) -> None:
    """Training on shards: a sample without a label (no cls member, no json "label") would be a class "" of its
    own."""
    unlabelled = [f.path for f in members.files if not f.label]
    if unlabelled:
        raise UserError(f"{len(unlabelled)} sample(s) of the shards have no label (a cls member, or a json member's "
                        f"\"label\"), e.g. {unlabelled[0]}: each needs one here")


def _inputs(cfg: ExtractConfig) -> tuple[Path, list | Shards, list[str], Manifest | None]:
    """(root, files, classes, the --labels manifest or None): class folders, a flat folder, a label file, or
    WebDataset shards (their classes are known once they are read)."""
    if (patterns := shard_patterns(cfg)) is not None:
        paths = expand(patterns)
        return Path(os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])), Shards(paths), [], None
    if cfg.files is not None:
        root = Path(os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in cfg.files]))
        return root, [ImageFile(str(Path(p)), "") for p in cfg.files], [], None
    if cfg.labels is None:
        return (*scan(cfg.data_dir, labelled=False), None)
    root = shipped_dataset() if cfg.data_dir is None else Path(cfg.data_dir)
    listed = read_manifest(cfg.labels, root)
    return root, listed.files, listed.classes, listed


def _engine(cfg: ExtractConfig, spec, key: CacheKey, timer: StageTimer, index: FileIndex):
    """engine.Engine with the local compute stage, or Ray Data's engine: its modules (and Ray) load only when asked
    for."""
    if cfg.engine == "ray":
        from featpipe.ray_data import RayDataEngine

        return RayDataEngine(cfg, spec, key, timer, index)
    from featpipe.compute import LocalCompute

    return Engine(LocalCompute(cfg, spec, timer), timer, index)
