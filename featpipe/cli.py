"""`featpipe` command line. Each command is a thin shell over a library function; errors are one line, exit 2."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

try:  # recent typer vendors click as typer._click; older typer uses click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException

from featpipe.errors import UserError

app = typer.Typer(
    name="featpipe",
    help="Prove on your own images that a pretrained backbone beats training from scratch — then ship the fast model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from featpipe import __version__

        typer.echo(f"featpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print featpipe's version and exit.")] = False) -> None:
    """Prove on your own images that a pretrained backbone beats training from scratch — then ship the fast model."""

DataDir = Annotated[Optional[Path], typer.Argument(
    help="ImageFolder tree DATA_DIR/<class>/<image>. Default: the shipped 196-photo, 5-class dataset.",
    show_default=False)]
BackboneOpt = Annotated[str, typer.Option("--backbone", "-b", help="Registry name (`featpipe backbones`) or any "
                                          "torchvision/timm model name.")]
CacheDirOpt = Annotated[Path, typer.Option("--cache-dir", help="Where the HDF5 embedding caches live.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda (auto: cuda when available).")]
DecoderOpt = Annotated[str, typer.Option("--decoder", help="auto | dali | torchvision | pil (auto: nvJPEG on a GPU, "
                                           "through DALI, else torchvision; Pillow on CPU. Without a GPU, dali is "
                                           "DALI's CPU pipeline, torchvision libjpeg-turbo).")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="auto | fp32 | bf16 (auto: bf16 where the hardware "
                                           "has bf16 units: AMX/AVX512-BF16 CPUs, recent GPUs).")]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="Local checkpoint (state dict) for the "
                                                    "backbone, instead of the packaged/hub weights.")]
EngineOpt = Annotated[str, typer.Option("--engine", help="local | ray (decode + forward on Ray actors; needs the "
                                        "ray extra).")]
RayAddressOpt = Annotated[Optional[str], typer.Option("--ray-address", help="--engine ray: join this Ray cluster "
                                                      "(e.g. HEAD:6379 or auto) instead of starting a local Ray.")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", help="--engine ray: embedding actors (default: one "
                                                   "per GPU of the cluster, else one per CPU).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace a bundle at the output dir even if it was trained "
                                        "on another data dir.")]


_NOTES: list[str] = []  # said on stderr after a command succeeds: an error stays the one line it is


def _data(data_dir: Optional[Path]) -> Optional[Path]:
    """A missing DATA_DIR is easy to miss: say that the shipped photos stood in for it (all 196 take seconds)."""
    if data_dir is None:
        _NOTES.append("featpipe: no DATA_DIR given: used the shipped demo set (196 photos, 5 classes); pass DATA_DIR "
                      "to use your own images")
    return data_dir


def _classes(counts: dict[str, int]) -> str:
    return "classes: " + ", ".join(f"{c} {n}" for c, n in counts.items())


def _json_safe(obj):
    """File names that are not UTF-8 reach Python as lone surrogates, which strict JSON readers reject: such a
    string is written percent-encoded whole (urllib.parse.unquote_to_bytes gives back the name's bytes)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            from urllib.parse import quote

            return quote(obj.encode("utf-8", "surrogateescape"), safe="/")
        return obj
    if isinstance(obj, dict):
        return {_json_safe(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _emit(obj: dict, as_json: bool, text: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(_json_safe(obj)) + "\n")
    else:
        typer.echo(text)


@app.command()
def extract(
    data_dir: DataDir = None,
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
    as_json: JsonOpt = False,
) -> None:
    """Embed every image once with a frozen pretrained backbone; cache in HDF5 (re-runs compute only new images)."""
    from featpipe.extract import ExtractConfig

    cfg = ExtractConfig(_data(data_dir), backbone, cache_dir, device, decoder, precision, batch_size, weights,
                        engine=engine, ray_address=ray_address, workers=workers)
    from featpipe.progress import run_extract

    res = run_extract(cfg)
    _emit(res.to_json(), as_json, f"cache: {res.cache_file}")



@app.command("export-embeddings")
def export_embeddings(
    data_dir: DataDir = None,
    out: Annotated[Path, typer.Option("--out", help="File to write (npy: also a .csv of path, label, sha256 "
                                      "beside it).")] = Path("embeddings.parquet"),
    fmt: Annotated[str, typer.Option("--format", help="parquet (path, label, sha256, embedding as a fixed-size "
                                     "list) | npy (the float32 matrix).")] = "parquet",
    backbone: BackboneOpt = "mobilenet_v2",
    cache_dir: CacheDirOpt = Path("cache"),
    device: DeviceOpt = "auto",
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write the data dir's embeddings (extracting what is missing) for pandas, polars, DuckDB, numpy."""
    from featpipe.export import ExportConfig, export
    from featpipe.extract import ExtractConfig
    from featpipe.progress import run_extract

    cfg = ExportConfig(ExtractConfig(_data(data_dir), backbone, cache_dir, device, weights=weights), out, fmt)
    r = export(cfg, run_extract(cfg.extract))
    _emit(r, as_json, f"{r['rows']} rows x {r['dim']} -> {', '.join(r['files'])}")


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
    _emit({"backbones": rows}, as_json, "\n".join(lines))


@app.command("fit-head")
def fit_head(
    data_dir: DataDir = None,
    backbone: BackboneOpt = "mobilenet_v2",
    cache_dir: CacheDirOpt = Path("cache"),
    device: DeviceOpt = "auto",
    head: Annotated[str, typer.Option("--head", help="logistic (scaled logistic regression; C by inner CV, or on a "
                                      "hold-out above 10,000 rows) | mlp (one hidden layer, early stopping).")
                    ] = "logistic",
    cv: Annotated[Optional[int], typer.Option("--cv", help="Also report K-fold CV accuracy (mean ± std) of the "
                                              "whole head procedure over every image.")] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Stratified share of each class held out "
                                                "for val_accuracy (0: none).")] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="Split, CV and MLP seed.")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="Bundle directory (default "
                                                "models/<backbone>-<head>).")] = None,
    weights: WeightsOpt = None,
    force: ForceOpt = False,
    features_dtype: Annotated[str, typer.Option("--features-dtype", help="float32 | float16: how the cached "
                                                "embeddings are held while fitting (float16: half the memory).")
                              ] = "float32",
    val_dir: Annotated[Optional[Path], typer.Option("--val-dir", help="A separate labelled validation folder "
                                                    "instead of the random split (--val-fraction).")] = None,
    test_dir: Annotated[Optional[Path], typer.Option("--test-dir", help="A labelled test folder scored once at "
                                                     "the end (test_accuracy), never used to choose anything.")
                        ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a light head on cached embeddings (extracting what is missing first); save a model bundle."""
    from featpipe.extract import ExtractConfig
    from featpipe.fit_head import FitConfig, fit_and_save
    from featpipe.heads import HeadConfig

    r = fit_and_save(FitConfig(ExtractConfig(_data(data_dir), backbone, cache_dir, device, weights=weights),
                               HeadConfig(head, seed), cv, val_fraction, out, force, features_dtype, val_dir,
                               test_dir))
    cv_text = f", cv {r['cv_accuracy_mean']:.3f} ± {r['cv_accuracy_std']:.3f}" if cv else ""
    val_text = f"{r['val_accuracy']:.3f}" if r["val_accuracy"] is not None else "n/a"
    if test_dir is not None:
        cv_text += f"; test {r['test_accuracy']:.3f} ({r['n_test']} images)"
    _emit(r, as_json, f"{r['head']} head on {r['backbone']}: train {r['train_accuracy']:.3f}, val {val_text} "
          f"({r['n_train']} train / {r['n_val']} val){cv_text}; fit {r['fit_seconds']:.2f} s\n"
          f"{_classes(r['class_counts'])}\nmodel: {r['model_path']}")


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="Model bundle directory (from `featpipe fit-head`).")],
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively).")],
    top_k: Annotated[int, typer.Option("--top-k", help="Classes to report per image.")] = 3,
    device: DeviceOpt = "auto",
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Classify images with a model bundle; unreadable files are listed as skipped, never fatal."""
    from featpipe.predict import PredictConfig
    from featpipe.progress import run_predict

    r = run_predict(PredictConfig(model, paths, top_k, device, weights))
    lines = [f"{p['path']}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in p["top"])
             for p in r["predictions"]]
    if as_json or lines:  # every file skipped: no blank line on stdout
        _emit(r, as_json, "\n".join(lines))


@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(help="Model bundle directory (from fit-head, finetune or experiment).")],
    data_dir: Annotated[Path, typer.Argument(help="Labelled ImageFolder DATA_DIR/<class>/<image> to score on: "
                                                  "images the model was not fitted or selected on.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write evaluation.json, confusion.json and "
                                                "confusion.png here.")] = None,
    worst: Annotated[int, typer.Option("--worst", help="Most confidently wrong images to list.")] = 20,
    device: DeviceOpt = "auto",
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score a model bundle on a labelled folder: accuracy (top-5 past 5 classes), per-class precision / recall /
    F1, confusion matrix, the most confidently wrong images."""
    from featpipe.evaluate import EvaluateConfig
    from featpipe.progress import run_evaluate

    r = run_evaluate(EvaluateConfig(model, data_dir, out, device, weights, worst))
    top5 = f", top-5 {r['top5_accuracy']:.3f}" if "top5_accuracy" in r else ""
    lines = [f"accuracy {r['accuracy']:.3f}{top5} on {r['images']} images; macro F1 {r['macro']['f1']:.3f}"]
    lines += [f"  {c}: precision {v['precision']:.3f}, recall {v['recall']:.3f}, F1 {v['f1']:.3f} "
              f"({v['support']})" for c, v in r["per_class"].items()]
    lines += [f"  wrong at {w['probability']:.3f}: {w['path']} ({w['label']} -> {w['predicted']})"
              for w in r["most_confidently_wrong"][:5]]
    _emit(r, as_json, "\n".join(lines + ([f"files: {r['files']['evaluation.json']}"] if out else [])))


ValFractionOpt = Annotated[float, typer.Option("--val-fraction", help="Stratified validation share (same split for "
                                               "every method and backbone).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Split, augmentation and initialisation seed.")]
EpochsOpt = Annotated[int, typer.Option("--epochs", min=1, help="Most epochs (early stopping on val accuracy).")]


def _train_summary(res) -> str:
    return (f"{res.method} {res.backbone}: train acc {res.train_accuracy:.3f}, val acc {res.val_accuracy:.3f}, "
            f"best epoch {res.best_epoch}/{res.epochs_run}, {res.train_seconds:.1f} s\n{_classes(res.class_counts)}"
            + (f"\nmodel: {res.model_path}" if res.model_path else ""))


@app.command()
def finetune(
    data_dir: DataDir = None,
    backbone: BackboneOpt = "mobilenet_v2",
    cache_dir: CacheDirOpt = Path("cache"),
    device: DeviceOpt = "auto",
    unfreeze_blocks: Annotated[int, typer.Option("--unfreeze-blocks", min=1, help="Train the last N blocks of the "
                                                 "backbone (and the head); the rest stays frozen.")] = 3,
    epochs: EpochsOpt = 3,
    head: Annotated[str, typer.Option("--head", help="The warm-started head, fitted on the cached features first: "
                                      "logistic | mlp (as fit-head).")] = "logistic",
    val_fraction: ValFractionOpt = 0.2,
    seed: SeedOpt = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="Model bundle dir (default "
                                                "models/<backbone>-finetuned).")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune the last blocks of a pretrained backbone, head warm-started from the cached-feature head; saves a
    bundle `featpipe predict` loads."""
    from featpipe.train import TrainConfig, finetune as run

    res = run(TrainConfig(_data(data_dir), backbone, cache_dir, device, epochs=epochs,
                          unfreeze_blocks=unfreeze_blocks, val_fraction=val_fraction, seed=seed, out=out, head=head,
                          force=force))
    _emit(res.to_json(), as_json, _train_summary(res))


@app.command()
def scratch(
    data_dir: DataDir = None,
    backbone: BackboneOpt = "mobilenet_v2",
    device: DeviceOpt = "auto",
    epochs: EpochsOpt = 3,
    val_fraction: ValFractionOpt = 0.2,
    seed: SeedOpt = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="Model bundle dir (default "
                                                "models/<backbone>-scratch).")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train the same architecture from random init (every layer): the baseline the pretrained methods must beat;
    saves a bundle `featpipe predict` loads."""
    from featpipe.train import TrainConfig, scratch as run

    res = run(TrainConfig(_data(data_dir), backbone, device=device, epochs=epochs, val_fraction=val_fraction,
                          seed=seed, out=out, force=force))
    _emit(res.to_json(), as_json, _train_summary(res))


def _csv(value: Optional[str]) -> Optional[list[str]]:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


@app.command()
def experiment(
    data_dir: DataDir = None,
    backbones: Annotated[Optional[str], typer.Option("--backbones", help="Comma-separated backbone names.",
                                                     show_default="mobilenet_v2,efficientnet_lite0")] = None,
    methods: Annotated[Optional[str], typer.Option("--methods", help="Comma-separated subset of "
                                                   "scratch,head,finetune.", show_default="all")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Report dir.",
                                                show_default="reports/experiment")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML file (pipelines/*.toml): also "
                                                   "sets cv, head, and the finetune and scratch sections (epochs, "
                                                   "rates); flags override it.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Where the HDF5 embedding caches live.",
                                                      show_default="cache")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda.",
                                                  show_default="auto")] = None,
    val_fraction: Annotated[Optional[float], typer.Option("--val-fraction", help="Stratified validation share, "
                                                          "the same for every method and backbone.",
                                                          show_default="0.2")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Split, augmentation and initialisation seed.",
                                                show_default="0")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Scratch vs head vs fine-tune per backbone on one split: report.json, report.md, report.png, confusion.png."""
    _run_experiment(config, {"data_dir": data_dir, "backbones": _csv(backbones), "methods": _csv(methods),
                             "out": out, "cache_dir": cache_dir, "device": device, "val_fraction": val_fraction,
                             "seed": seed}, as_json)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Report dir.")] = Path("reports/demo"),
    cache_dir: CacheDirOpt = Path("cache"),
    as_json: JsonOpt = False,
) -> None:
    """The experiment on the shipped dataset with the default settings (a few minutes on a laptop CPU)."""
    _run_experiment(None, {"out": out, "cache_dir": cache_dir}, as_json)


cache_app = typer.Typer(help="Inspect and maintain the embedding caches (`cache info`, `cache compact`).",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def cache_info(cache_dir: CacheDirOpt = Path("cache"), as_json: JsonOpt = False) -> None:
    """Per cache key: rows, shards, bytes, backbone, precision."""
    from featpipe.cache_admin import info

    r = info(cache_dir)
    lines = [f"{c['key']}: {c['rows']} rows in {c['shards']} shard(s), {c['bytes'] / 2**20:.1f} MiB"
             + (f", {c['journal_rows']} in journals" if c["journal_rows"] else "") for c in r["caches"]]
    lines += [f"{p}: format 1 (the next extract with its backbone converts it)" for p in r["format1"]]
    _emit(r, as_json, "\n".join(lines) or f"no caches in {cache_dir}")


@cache_app.command("compact")
def cache_compact(cache_dir: CacheDirOpt = Path("cache"), as_json: JsonOpt = False) -> None:
    """Merge small shards into full ones and drop rows that no file in the file index refers to any more
    (shards younger than an hour keep every row). Crash-safe: a kill leaves the cache as before or as after."""
    from featpipe.cache_admin import compact

    r = compact(cache_dir)
    lines = [f"{c['key']}: {c['shards']} -> {c['shards_after']} shard(s), {c['dropped_rows']} unreferenced row(s) "
             f"dropped" for c in r["caches"]]
    if not r["file_index_used"]:
        lines.append("no file index: every row kept")
    _emit(r, as_json, "\n".join(lines) or f"no caches in {cache_dir}")


def _run_experiment(config: Optional[Path], flags: dict, as_json: bool) -> None:
    from featpipe.experiment import ExperimentConfig, read_config, run
    from featpipe.report import table

    kw = read_config(config) if config else {}
    kw.update({k: v for k, v in flags.items() if v is not None})
    if "data_dir" in flags:  # demo has none to give: it is the shipped set by definition
        _data(kw.get("data_dir"))
    report = run(ExperimentConfig(**kw))
    summary = table(report) + f"\n\nreport: {report['files']['report.md']}"
    if as_json:
        print(summary, file=sys.stderr)  # stdout holds the one JSON object
    _emit(report, as_json, summary)


def main() -> None:
    """Entry point: usage errors and UserError become one line on stderr with exit code 2."""
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="featpipe", standalone_mode=False)
    except ClickException as e:
        _fail(e.format_message(), e.exit_code)
    except typer.Abort:
        _fail("aborted", 130)
    except UserError as e:
        _fail(str(e), 2)
    except KeyboardInterrupt:
        _interrupted()
    if code == 130:  # typer turns Ctrl-C inside a command into a silent exit code 130
        _interrupted()
    for note in _NOTES:
        print(note, file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"featpipe: error: {' '.join(message.split())}\n")
    sys.exit(code)


def _interrupted() -> None:
    """Ctrl-C: say so and leave at once. Interpreter shutdown would race the pipeline's daemon threads still inside
    torch (seen: 'terminate called without an active exception', SIGABRT). Nothing is lost by skipping it: the
    journal is flushed per batch and the kernel releases the cache lock, as after a kill."""
    sys.stderr.write("featpipe: error: interrupted\n")
    sys.stderr.flush()
    os._exit(130)
