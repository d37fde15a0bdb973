"""Commands over images and their cached embeddings: extract, export-embeddings, backbones, audit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from featpipe.cli.app import (BackboneOpt, CacheDirOpt, DataDir, DecoderOpt, DeviceOpt, EngineOpt, JsonOpt,
                              LabelsOpt, PrecisionOpt, RayAddressOpt, TtaOpt, WeightsOpt, WorkersOpt, app,
                              data_or_shipped, emit)
from featpipe.neighbours import NEAR_COSINE


DataDirsOrShards = Annotated[Optional[list[Path]], typer.Argument(
    metavar="DATA_DIR | SHARDS",
    help="ImageFolder tree DATA_DIR/<class>/<image> (or a folder of unlabelled images), or WebDataset .tar shards: "
         "paths, brace patterns (train-{000000..000099}.tar) or globs, quoted or not. Default: the shipped "
         "196-photo, 5-class dataset.", show_default=False)]


@app.command()
def extract(
    data_dir: DataDirsOrShards = None,
    backbone: BackboneOpt = "mobilenet_v2",
    cache_dir: CacheDirOpt = Path("cache"),
    device: DeviceOpt = "auto",
    decoder: DecoderOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Images per forward pass "
                                                      "(default 16 on CPU, 256 on CUDA).")] = None,
    weights: WeightsOpt = None,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    workers: WorkersOpt = None,
    labels: LabelsOpt = None,
    tta: TtaOpt = "none",
    as_json: JsonOpt = False,
) -> None:
    """Embed every image once with a frozen pretrained backbone; cache in HDF5 (re-runs compute only new images)."""
    from featpipe.extract import ExtractConfig
    from featpipe.progress import run_extract
    from featpipe.tar_input import shard_args

    shards = shard_args(data_dir)
    folder = None if shards else data_or_shipped(data_dir[0] if data_dir else None)
    cfg = ExtractConfig(data_dir=folder, shards=shards, backbone=backbone, cache_dir=cache_dir, device=device,
                        decoder=decoder, precision=precision, batch_size=batch_size, weights=weights, engine=engine,
                        ray_address=ray_address, workers=workers, labels=labels, tta=tta)

    res = run_extract(cfg)
    emit(res.to_json(), as_json, f"cache: {res.cache_file}")



@app.command("export-embeddings")
def export_embeddings(
    data_dir: DataDir = None,
    out: Annotated[Path, typer.Option("--out", help="File to write (npy: also a .csv of path, label, sha256 "
                                      "beside it).")] = Path("embeddings.parquet"),
    fmt: Annotated[Optional[str], typer.Option("--format", help="parquet (path, label, sha256, embedding as a "
                                               "fixed-size list) | npy (the float32 matrix).",
                                               show_default="--out's suffix: .npy is npy, else parquet")] = None,
    backbone: BackboneOpt = "mobilenet_v2",
    cache_dir: CacheDirOpt = Path("cache"),
    device: DeviceOpt = "auto",
    weights: WeightsOpt = None,
    labels: LabelsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write the data dir's embeddings (extracting what is missing) for pandas, polars, DuckDB, numpy."""
    from featpipe.export import ExportConfig, export
    from featpipe.extract import ExtractConfig
    from featpipe.progress import run_extract

    extract = ExtractConfig(data_dir=data_or_shipped(data_dir), backbone=backbone, cache_dir=cache_dir, device=device,
                            weights=weights, labels=labels)
    cfg = ExportConfig(extract=extract, out=out, format=fmt)
    r = export(cfg, run_extract(cfg.extract))
    emit(r, as_json, f"{r['rows']} rows x {r['dim']} -> {', '.join(r['files'])}")


@app.command()
def backbones(as_json: JsonOpt = False) -> None:
    """List the built-in backbones and whether their pretrained weights are available offline."""
    from featpipe.registry import REGISTRY

    rows = [{"name": s.name, "library": s.library, "arch": s.arch, "dim": s.dim,
             "input": s.preprocessing.crop, "offline": s.weights_available(), "description": s.description}
            for s in REGISTRY.values()]
    lines = [f"{r['name']:<20} {'offline' if r['offline'] else 'needs download':<15} {r['dim']:>5}-d  "
             f"{r['input']}px  {r['description']}" for r in rows]
    lines.append("Any other torchvision or timm model name works with network access or --weights PATH.")
    emit({"backbones": rows}, as_json, "\n".join(lines))


@app.command()
def audit(
    data_dir: DataDir = None,
    test_dir: Annotated[Optional[Path], typer.Option("--test-dir", help="A held-out folder (labelled or not): "
                                                     "its images that are also training images are leaks.")] = None,
    near: Annotated[float, typer.Option("--near", help="Cosine at or above which two different files count as the "
                                        "same picture (calibrated for mobilenet_v2: bench/README.md).")
                    ] = NEAR_COSINE,
    folds: Annotated[int, typer.Option("--folds", help="K for the out-of-fold probabilities behind the label "
                                       "issues, and for the two CV accuracies.")] = 5,
    seed: Annotated[int, typer.Option("--seed", help="Fold seed.")] = 0,
    out: Annotated[Path, typer.Option("--out", help="Where audit.json, audit.md, map.png and audit.html go.")
                   ] = Path("reports/audit"),
    backbone: BackboneOpt = "mobilenet_v2",
    cache_dir: CacheDirOpt = Path("cache"),
    device: DeviceOpt = "auto",
    weights: WeightsOpt = None,
    labels: LabelsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Exact and near duplicates, train/test leaks, likely label errors, and how much duplicates inflate K-fold
    accuracy, from the cached embeddings (extracting what is missing)."""
    from featpipe.audit import AuditConfig, audit as run
    from featpipe.extract import ExtractConfig

    extract = ExtractConfig(data_dir=data_or_shipped(data_dir), backbone=backbone, cache_dir=cache_dir, device=device,
                            weights=weights, labels=labels)
    r = run(AuditConfig(extract=extract, test_dir=test_dir, near=near, folds=folds, seed=seed, out=out))
    cv = r["cv"]
    emit(r, as_json, f"{len(r['duplicates'])} duplicate set(s) "
         f"({sum(s['across_classes'] for s in r['duplicates'])} across classes), {len(r['leaks'])} leak(s), "
         f"{len(r['label_issues'])} likely label error(s); {cv['folds']}-fold accuracy {_mean(cv['ungrouped'])} "
         f"ungrouped, {_mean(cv['grouped'])} with duplicates in one fold\n"
         + "".join(f"{n}\n" for n in r["notes"]) + f"report: {r['files']['audit.md']}")


def _mean(a: dict | None) -> str:
    return "n/a" if a is None else f"{a['mean']:.3f}"
