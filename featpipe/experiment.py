"""The experiment: scratch vs frozen-backbone head vs fine-tuned last blocks, per backbone, on one shared split.

Per backbone the images are extracted once (cached embeddings for the head and the fine-tune warm start), timed
apart from training; fine-tune and scratch decode their batches as they train (train_images), inside their time.
Every row's model is saved as a bundle `featpipe predict` loads (cfg.out/models/<backbone>-<method or head kind>).
Every pretrained backbone's weights are checked before any work, so a config naming an unavailable one stops at
once instead of after an hour of the others.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from featpipe import __version__, registry
from featpipe.errors import UserError
from featpipe.extract import DEFAULT_CACHE_DIR, ExtractConfig
from featpipe.splits import Groups, check_k
from featpipe.tar_input import is_shard
from featpipe.train import TrainConfig, finetune, scratch
from featpipe.held_out import arrange, check_folders
from featpipe.train_images import scan_images, split_images

METHODS = ("scratch", "head", "finetune")
DEFAULT_BACKBONES = ("mobilenet_v2", "efficientnet_lite0")
TUTORIAL_MIN_VAL = 0.80
TUTORIAL_MAX_SECONDS = 30 * 60


@dataclass
class ExperimentConfig:
    data_dir: Path | None = None
    backbones: list[str] = field(default_factory=lambda: list(DEFAULT_BACKBONES))
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    out: Path = Path("reports/experiment")
    cache_dir: Path = DEFAULT_CACHE_DIR
    device: str = "auto"
    val_fraction: float = 0.2
    seed: int = 0
    cv: int = 5  # head: K-fold CV over every image (fewer folds when the smallest class is smaller)
    head: str = "logistic"
    val_dir: Path | None = None  # a validation folder instead of the random split, for every method
    test_dir: Path | None = None  # scored once per row at the end, never used to choose anything
    labels: Path | None = None  # a CSV/Parquet of paths and labels (optional split column) instead of class folders
    # TrainConfig overrides; what is not given takes TrainConfig's defaults (scratch: lr_head is its only lr)
    finetune: dict = field(default_factory=lambda: {"epochs": 3, "unfreeze_blocks": 3})
    scratch: dict = field(default_factory=lambda: {"epochs": 6})

    def __post_init__(self) -> None:
        if self.data_dir is not None and is_shard(self.data_dir):
            raise UserError(f"{self.data_dir}: the experiment's fine-tune and scratch read image files as they "
                            f"train; WebDataset shards go to extract, fit-head, export-embeddings and audit")
        if not self.backbones:
            raise UserError("--backbones must name at least one backbone")
        if len(set(self.backbones)) < len(self.backbones):
            raise UserError(f"--backbones names a backbone twice: {','.join(self.backbones)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise UserError(f"--methods must be a comma-separated subset of {','.join(METHODS)} (got "
                            f"{','.join(self.methods) or 'nothing'})")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in (0, 1): the methods are compared on that held-out share "
                            f"(got {self.val_fraction})")
        check_k(self.cv, "cv")
        for section in ("finetune", "scratch"):  # unknown keys, bad values, the head kind: fail before any work
            self.train_config(section, self.backbones[0])

    def train_config(self, method: str, backbone: str) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(TrainConfig)} - {"data_dir", "backbone", "cache_dir", "device",
                                                                     "val_fraction", "seed", "out", "head", "force",
                                                                     "resume", "val_dir", "test_dir", "labels"}
        given = getattr(self, method)
        unknown = sorted(set(given) - known)
        if unknown:
            raise UserError(f"[{method}] has unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        out = self.out / "models" / f"{backbone}-{'finetuned' if method == 'finetune' else method}"
        return TrainConfig(data_dir=self.data_dir, backbone=backbone, cache_dir=self.cache_dir, device=self.device,
                           val_fraction=self.val_fraction, seed=self.seed, out=out, head=self.head, force=True,
                           **given)  # force: the bundle lives in this experiment's own report dir

    def resolved(self) -> dict:
        """Every setting actually used, defaults filled in: what report.json records."""
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}
        d["data_dir"] = str(self.data_dir) if self.data_dir else "shipped:gcompris-photos"
        for method in ("finetune", "scratch"):
            t = dataclasses.asdict(self.train_config(method, self.backbones[0]))
            d[method] = {k: v for k, v in t.items() if k in TRAIN_KEYS[method]}
        return d


TRAIN_KEYS = {"finetune": ("epochs", "unfreeze_blocks", "lr_head", "lr_backbone", "weight_decay", "batch_size",
                           "patience", "min_scale"),
              "scratch": ("epochs", "lr_head", "weight_decay", "batch_size", "patience", "min_scale")}


def read_config(path: Path) -> dict:
    """A pipelines/*.toml file -> ExperimentConfig keyword arguments ([experiment] keys + [finetune]/[scratch])."""
    try:
        doc = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"cannot read config {path}: {e}") from None
    kw = dict(doc.pop("experiment", {}))
    for section in ("finetune", "scratch"):
        if section in doc:
            kw[section] = doc.pop(section)
    known = {f.name for f in dataclasses.fields(ExperimentConfig)}
    unknown = sorted(set(kw) - known) + [f"[{s}]" for s in doc]
    if unknown:
        raise UserError(f"config {path}: unknown key(s) {', '.join(unknown)}")
    check_types(f"config {path}: [experiment]", kw, ExperimentConfig)
    for section in ("finetune", "scratch"):
        check_types(f"config {path}: [{section}]", kw.get(section, {}), TrainConfig)
    for key in ("data_dir", "out", "cache_dir", "val_dir", "test_dir", "labels"):
        if key in kw:
            kw[key] = Path(kw[key])
    return kw


def check_types(where: str, values: dict, cls: type) -> None:
    """TOML values against the dataclass's annotations (flags arrive typed; a config file's values do not)."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key in hints and not _fits(value, hints[key]):
            raise UserError(f"{where} {key} must be {_type_name(hints[key])} (got {value!r})")


def _fits(value, hint) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, str if hint is Path else hint)


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return "a list of strings" if typing.get_args(hint) == (str,) else "a list"
    return {int: "an integer", float: "a number", str: "a string", Path: "a path (string)",
            dict: "a table"}.get(hint, hint.__name__)


def check_weights(cfg: ExperimentConfig) -> list:
    """Resolve every backbone and, if a pretrained method is asked for, make sure its weights load offline."""
    from featpipe.backbone import offline_error

    specs = [registry.resolve(name) for name in cfg.backbones]
    if {"head", "finetune"} & set(cfg.methods):
        for spec in specs:
            if not spec.weights_available():
                hint = spec.install_hint or (f"run `featpipe extract --backbone {spec.name}` once with network "
                                             f"access to cache them")
                raise offline_error(spec, "not packaged, not in torch's hub cache",
                                    f"{hint}, or leave it out of --backbones")
    return specs


def run(cfg: ExperimentConfig, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Run every method x backbone; write report.json, report.md, report.png and confusion.png under cfg.out, and
    each row's model bundle under cfg.out/models (the report links to them)."""
    from featpipe.dataset import scan
    from featpipe.runtime import prepare

    t_start = time.perf_counter()
    specs = check_weights(cfg)
    if cfg.labels is None:
        scan(cfg.data_dir)  # a bad DATA_DIR fails now, not after the first backbone's work
    check_folders(ExtractConfig(data_dir=cfg.data_dir, labels=cfg.labels), cfg.val_dir, cfg.test_dir)
    device = str(prepare(cfg.device)[0])
    results, backbones, preds = [], {}, {}
    for spec in specs:
        info, rows = run_backbone(cfg, spec, log)
        backbones[spec.name] = info
        for r, pred in rows:
            results.append(r)
            preds[(r["method"], r["backbone"])] = pred
    by_key = {(r["method"], r["backbone"]): r for r in results}
    best = max(results, key=lambda r: (r["val_accuracy"], -r["train_seconds"]))
    first = next(iter(backbones.values()))
    y_val = first["y_val"]
    report = {
        "results": results, "device": device, "featpipe_version": __version__, "backbones": {
            k: {kk: vv for kk, vv in v.items() if kk != "y_val"} for k, v in backbones.items()},
        "dataset": {"classes": first["classes"], "images_per_class": first["images_per_class"],
                    "n_train": first["n_train"], "n_val": first["n_val"], "validation": first["validation"],
                    "majority_val_accuracy": round(float(np.bincount(y_val).max() / len(y_val)), 4)},
        "timings": {"one_time": {k: {"extract_seconds": v["extract_seconds"], "prepare_seconds": v["prepare_seconds"]}
                                 for k, v in backbones.items()},
                    "training": {f"{r['method']}/{r['backbone']}": r["train_seconds"] for r in results},
                    "total_seconds": None},
        "best": {"method": best["method"], "backbone": best["backbone"], "val_accuracy": best["val_accuracy"],
                 "model_path": best["model_path"],
                 "confusion": confusion(y_val, preds[(best["method"], best["backbone"])], len(first["classes"]))},
        "config": cfg.resolved(),
    }
    for r in results:
        scratch_r = by_key.get(("scratch", r["backbone"]))
        r["speedup_vs_scratch"] = round(scratch_r["train_seconds"] / r["train_seconds"], 2) if scratch_r and \
            r["train_seconds"] > 0 else None
    report["timings"]["total_seconds"] = round(time.perf_counter() - t_start, 2)
    from featpipe.report import write

    return write(report, cfg.out)


def run_backbone(cfg: ExperimentConfig, spec, log) -> tuple[dict, list[tuple[dict, np.ndarray]]]:
    """One backbone: extract (if a pretrained method runs; else list and check the files), then each method."""
    from featpipe.features import load_features

    held, extract_seconds = None, 0.0
    if {"head", "finetune"} & set(cfg.methods) or cfg.val_dir or cfg.test_dir or cfg.labels:
        t0 = time.perf_counter()
        extract = ExtractConfig(data_dir=cfg.data_dir, backbone=spec.name, cache_dir=cfg.cache_dir,
                                device=cfg.device, labels=cfg.labels)
        held = arrange(load_features(extract), extract, cfg.val_dir, cfg.test_dir, cfg.val_fraction, cfg.seed,
                       val_needed=True)
        extract_seconds = time.perf_counter() - t0
        f = held.features
        images = split_images(f.paths, f.y, f.classes, f.sha256, f.groups, spec.preprocessing, cfg.val_fraction,
                              cfg.seed, given=(held.split, held.validation))
    else:
        images = scan_images(cfg.data_dir, spec.name, cfg.val_fraction, cfg.seed)
    classes, y, split = images.classes, images.y, images.split
    rows = []
    for method in [m for m in METHODS if m in cfg.methods]:
        log(f"== {method} / {spec.name}")
        if method == "head":
            rows.append(run_head(cfg, held))
            continue
        tc = cfg.train_config(method, spec.name)
        if method == "finetune":
            res = finetune(tc, held, log=log, images=images)
        else:
            res = scratch(tc, log=log, images=images, held=held)
        rows.append((res.to_json() | {"only_last_layers_trained": method == "finetune"}, res.val_pred))
    for r, _ in rows:
        r["meets_tutorial_task"] = bool(r["val_accuracy"] >= TUTORIAL_MIN_VAL and r["train_seconds"] <
                                        TUTORIAL_MAX_SECONDS and r["only_last_layers_trained"])
    key = held.features.result.cache.key if held is not None else None
    info = {"weights_sha256": key.weights_sha256 if key else "random-init",
            "preprocessing": json.loads(spec.preprocessing.to_json()),
            "extract_seconds": round(extract_seconds, 2),
            "prepare_seconds": images.prepare_seconds,
            "classes": classes, "images_per_class": {c: int((y == i).sum()) for i, c in enumerate(classes)},
            "n_train": int(len(split.train)), "n_val": int(len(split.val)), "y_val": y[split.val],
            "validation": images.validation}
    return info, rows


def run_head(cfg: ExperimentConfig, held) -> tuple[dict, np.ndarray]:
    """Fit the head on the training split's cached features (timed), score it, K-fold CV it on every image, and
    save it as fit-head would."""
    from featpipe.fit_head import fit_and_score
    from featpipe.heads import HeadConfig, accuracy

    f, split = held.features, held.split
    hc = HeadConfig(kind=cfg.head, seed=cfg.seed)
    k = min(cfg.cv, int(Groups.of(f.y, f.groups).per_class(len(f.classes)).min()))
    head, s, _ = fit_and_score(f, split, hc, k if k >= 2 else None)
    pred = head.predict_proba(f.X[split.val]).argmax(1)
    r = {"method": "head", "backbone": f.result.backbone, "train_accuracy": s["train_accuracy"],
         "val_accuracy": s["val_accuracy"], "train_seconds": round(s["fit_seconds"], 3),
         "cv_accuracy_mean": s["cv_accuracy_mean"], "cv_accuracy_std": s["cv_accuracy_std"],
         "cv_folds": k if k >= 2 else None, "history": [], "hyperparameters": {"head": hc.kind, **head.params},
         "n_train": int(len(split.train)), "n_val": int(len(split.val)), "only_last_layers_trained": True,
         "validation": held.validation}
    if held.test is not None:
        t = held.test
        r |= held.test_report(accuracy(head, t.X, t.y, np.arange(len(t.y))))
    r["model_path"] = str(save_head(cfg, f, head, r))
    return r, pred


def save_head(cfg: ExperimentConfig, f, head, r: dict) -> Path:
    """A head bundle exactly like fit-head's, under the report dir (models/<backbone>-<head>)."""
    from featpipe.bundle import save
    from featpipe.fit_head import head_bundle

    metrics = {k: r[k] for k in ("train_accuracy", "val_accuracy", "cv_accuracy_mean", "cv_accuracy_std", "n_train",
                                 "n_val", "cv_folds")}
    metrics |= {"fit_seconds": r["train_seconds"], "duplicate_files": f.duplicates.files,
                "val_fraction": cfg.val_fraction, "seed": cfg.seed}
    return save(head_bundle(f, head, metrics), cfg.out / "models" / f"{f.result.cache.key.backbone}-{head.kind}")


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> list[list[int]]:
    m = np.zeros((n, n), dtype=int)
    np.add.at(m, (y_true, y_pred), 1)
    return m.tolist()
