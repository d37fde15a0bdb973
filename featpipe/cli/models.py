"""Commands that train, run and score models: fit-head, predict, evaluate, finetune, scratch, experiment, demo."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from featpipe.cli.app import (BackboneOpt, CacheDirOpt, DataDir, DeviceOpt, FeatureBackboneOpt, ForceOpt,
                              JsonOpt, LabelsOpt, TtaOpt, WeightsOpt, app, classes_line, data_or_shipped, emit)
from featpipe.errors import UserError
from featpipe.neighbours import NEAR_COSINE

ValDirOpt = Annotated[Optional[Path], typer.Option("--val-dir", help="A separate labelled validation folder instead "
                                                   "of the random split (--val-fraction).")]
TestDirOpt = Annotated[Optional[Path], typer.Option("--test-dir", help="A labelled test folder scored once at the "
                                                    "end (test_accuracy), never used to choose anything.")]


@app.command("fit-head")
def fit_head(
    data_dir: DataDir = None,
    backbone: FeatureBackboneOpt = "mobilenet_v2",
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
    val_dir: ValDirOpt = None,
    test_dir: TestDirOpt = None,
    group_duplicates: Annotated[bool, typer.Option("--group-duplicates", help=f"Keep near duplicates (cosine >= "
                                                   f"{NEAR_COSINE}, as `featpipe audit` finds them) on one side of "
                                                   "the split and in one CV fold, as identical files always are.")
                                ] = False,
    labels: LabelsOpt = None,
    tta: TtaOpt = "none",
    as_json: JsonOpt = False,
) -> None:
    """Train a light head on cached embeddings (extracting what is missing first); save a model bundle."""
    from featpipe.extract import ExtractConfig
    from featpipe.fit_head import FitConfig, fit_and_save
    from featpipe.heads import HeadConfig

    extract = ExtractConfig(data_dir=data_or_shipped(data_dir), backbone=backbone, cache_dir=cache_dir, device=device,
                            weights=weights, labels=labels, tta=tta)
    r = fit_and_save(FitConfig(extract=extract, head=HeadConfig(kind=head, seed=seed), cv=cv, val_fraction=val_fraction,
                               out=out, force=force, features_dtype=features_dtype, val_dir=val_dir,
                               test_dir=test_dir, group_duplicates=group_duplicates))
    cv_text = f", cv {r['cv_accuracy_mean']:.3f} ± {r['cv_accuracy_std']:.3f}" if cv else ""
    val_text = f"{r['val_accuracy']:.3f}" if r["val_accuracy"] is not None else "n/a"
    if test_dir is not None:
        cv_text += f"; test {r['test_accuracy']:.3f} ({r['n_test']} images)"
    emit(r, as_json, f"{r['head']} head on {r['backbone']}: train {r['train_accuracy']:.3f}, val {val_text} "
          f"({r['n_train']} train / {r['n_val']} val){cv_text}; fit {r['fit_seconds']:.2f} s\n"
          f"{classes_line(r['class_counts'])}\nmodel: {r['model_path']}")


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="Model bundle directory (from `featpipe fit-head`).")],
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively).")],
    top_k: Annotated[int, typer.Option("--top-k", help="Classes to report per image.")] = 3,
    device: DeviceOpt = "auto",
    weights: WeightsOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write every prediction to this .csv or .parquet "
                                                "(path, predicted, probability, p:<class> per class), batch by "
                                                "batch, instead of listing them.")] = None,
    cache_dir: Annotated[Path, typer.Option("--cache-dir", help="The embedding cache the images are embedded "
                                            "through, as extract does (a fine-tuned bundle keys its own rows).")
                         ] = Path("cache"),
    as_json: JsonOpt = False,
) -> None:
    """Classify images with a model bundle; unreadable files are listed as skipped, never fatal."""
    from featpipe.predict import PredictConfig
    from featpipe.progress import run_predict

    r = run_predict(PredictConfig(model=model, paths=paths, top_k=top_k, device=device, weights=weights, out=out,
                                  cache_dir=cache_dir))
    lines = [f"{p['path']}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in p["top"])
             for p in r["predictions"]] + ([f"{r['predicted']} predictions -> {r['out']}"] if out else [])
    if as_json or lines:  # every file skipped: no blank line on stdout
        emit(r, as_json, "\n".join(lines))


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
    labels: LabelsOpt = None,
    cache_dir: CacheDirOpt = Path("cache"),
    as_json: JsonOpt = False,
) -> None:
    """Score a model bundle on a labelled folder: accuracy (top-5 past 5 classes), per-class precision / recall /
    F1, confusion matrix, the most confidently wrong images."""
    from featpipe.evaluate import EvaluateConfig
    from featpipe.progress import run_evaluate

    r = run_evaluate(EvaluateConfig(model=model, data_dir=data_dir, out=out, device=device, weights=weights,
                                      worst=worst, labels=labels, cache_dir=cache_dir))
    top5 = f", top-5 {r['top5_accuracy']:.3f}" if "top5_accuracy" in r else ""
    lines = [f"accuracy {r['accuracy']:.3f}{top5} on {r['images']} images; macro F1 {r['macro']['f1']:.3f}"]
    lines += [f"  {c}: precision {v['precision']:.3f}, recall {v['recall']:.3f}, F1 {v['f1']:.3f} "
              f"({v['support']})" for c, v in r["per_class"].items()]
    lines += [f"  wrong at {w['probability']:.3f}: {w['path']} ({w['label']} -> {w['predicted']})"
              for w in r["most_confidently_wrong"][:5]]
    emit(r, as_json, "\n".join(lines + ([f"files: {r['files']['evaluation.json']}"] if out else [])))


@app.command("export")
def export_model(
    model: Annotated[Path, typer.Argument(help="Model bundle directory (from fit-head, finetune or experiment).")],
    fmt: Annotated[str, typer.Option("--format", help="onnx: one graph, uint8 NHWC images at the bundle's crop "
                                     "size in, class probabilities out.")] = "onnx",
    out: Annotated[Optional[Path], typer.Option("--out", help="File to write (default MODEL/model.onnx).")] = None,
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a model bundle to run without featpipe (onnxruntime): normalisation, backbone, head and softmax in
    one graph; class names and preprocessing in its metadata."""
    if fmt.lower() != "onnx":
        raise UserError(f"--format must be onnx (got {fmt!r})")
    from featpipe.onnx_export import export_onnx

    r = export_onnx(model, out, weights)
    emit(r, as_json, f"{r['file']}: {r['bytes'] / 2**20:.1f} MiB, input {r['input']['name']} uint8 "
         f"(batch, {r['input']['shape'][1]}, {r['input']['shape'][2]}, 3), {len(r['classes'])} classes")


ValFractionOpt = Annotated[float, typer.Option("--val-fraction", help="Stratified validation share (same split for "
                                               "every method and backbone).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Split, augmentation and initialisation seed.")]
EpochsOpt = Annotated[int, typer.Option("--epochs", min=1, help="Most epochs (early stopping on val accuracy).")]


def _train_summary(res) -> str:
    test = f", test acc {res.test['test_accuracy']:.3f} ({res.test['n_test']} images)" if res.test else ""
    return (f"{res.method} {res.backbone}: train acc {res.train_accuracy:.3f}, val acc {res.val_accuracy:.3f}{test}, "
            f"best epoch {res.best_epoch}/{res.epochs_run}, {res.train_seconds:.1f} s\n{classes_line(res.class_counts)}"
            + (f"\nmodel: {res.model_path}" if res.model_path else ""))


ResumeOpt = Annotated[bool, typer.Option("--resume", help="Go on from the last epoch a killed run finished (its "
                                         "checkpoint.pt in the output dir), with the same data and settings.")]


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
    resume: ResumeOpt = False,
    val_dir: ValDirOpt = None,
    test_dir: TestDirOpt = None,
    labels: LabelsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune the last blocks of a pretrained backbone, head warm-started from the cached-feature head; saves a
    bundle `featpipe predict` loads."""
    from featpipe.train import TrainConfig, bundle_dir, finetune as run, training_data

    cfg = TrainConfig(data_dir=data_or_shipped(data_dir), backbone=backbone, cache_dir=cache_dir,
                      device=device, epochs=epochs, unfreeze_blocks=unfreeze_blocks, val_fraction=val_fraction,
                      seed=seed, out=out, head=head, force=force, resume=resume, val_dir=val_dir,
                      test_dir=test_dir, labels=labels)
    bundle_dir(cfg, "finetune")  # a bundle that must not be replaced: refused before extracting
    res = run(cfg, training_data(cfg))
    emit(res.to_json(), as_json, _train_summary(res))


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
    resume: ResumeOpt = False,
    labels: LabelsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the same architecture from random init (every layer): the baseline the pretrained methods must beat;
    saves a bundle `featpipe predict` loads."""
    from featpipe.train import TrainConfig, scratch as run

    res = run(TrainConfig(data_dir=data_or_shipped(data_dir), backbone=backbone, device=device, epochs=epochs,
                          val_fraction=val_fraction, seed=seed, out=out, force=force, resume=resume,
                          labels=labels))
    emit(res.to_json(), as_json, _train_summary(res))


def _csv(value: Optional[str]) -> Optional[list[str]]:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


@app.command()
def experiment(
    data_dir: DataDir = None,
    backbones: Annotated[Optional[str], typer.Option("--backbones", help="Comma-separated backbone names; `auto`: "
                                                     "every backbone whose weights are here, and one more head row "
                                                     "on the feature set fit-head --backbone auto would choose.",
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
    val_dir: ValDirOpt = None,
    test_dir: TestDirOpt = None,
    labels: LabelsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Scratch vs head vs fine-tune per backbone on one split: report.json, report.md, report.png, confusion.png."""
    _run_experiment(config, {"data_dir": data_dir, "backbones": _csv(backbones), "methods": _csv(methods),
                             "out": out, "cache_dir": cache_dir, "device": device, "val_fraction": val_fraction,
                             "seed": seed, "val_dir": val_dir, "test_dir": test_dir, "labels": labels}, as_json)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Report dir.")] = Path("reports/demo"),
    cache_dir: CacheDirOpt = Path("cache"),
    as_json: JsonOpt = False,
) -> None:
    """The experiment on the shipped dataset with the default settings (a few minutes on a laptop CPU)."""
    _run_experiment(None, {"out": out, "cache_dir": cache_dir}, as_json)


def _run_experiment(config: Optional[Path], flags: dict, as_json: bool) -> None:
    from featpipe.experiment import run
    from featpipe.experiment_config import ExperimentConfig, read_config
    from featpipe.report import table

    kw = read_config(config) if config else {}
    kw.update({k: v for k, v in flags.items() if v is not None})
    if "data_dir" in flags:  # demo has none to give: it is the shipped set by definition
        data_or_shipped(kw.get("data_dir"))
    report = run(ExperimentConfig(**kw))
    summary = table(report) + f"\n\nreport: {report['files']['report.md']}"
    if as_json:
        print(summary, file=sys.stderr)  # stdout holds the one JSON object
    emit(report, as_json, summary)
