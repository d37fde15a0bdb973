"""The experiment's settings: ExperimentConfig (flags and a pipelines/*.toml file, checked before any work) and
the backbones it runs (`auto` expanded)."""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from featpipe import feature_sets, registry
from featpipe.errors import UserError
from featpipe.extract import DEFAULT_CACHE_DIR
from featpipe.splits import check_k, check_seed
from featpipe.tar_input import is_shard
from featpipe.train import TrainConfig

METHODS = ("scratch", "head", "finetune")
DEFAULT_BACKBONES = ("mobilenet_v2", "efficientnet_lite0")


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
        check_seed(self.seed, "seed")
        if feature_sets.AUTO in self.backbones and "head" in self.methods and self.head != "logistic":
            raise UserError("--backbones auto chooses its feature set with the logistic head's inner CV: set head = "
                            "\"logistic\", or name the backbones")
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
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
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


def plan(cfg: ExperimentConfig) -> tuple[list, tuple[str, ...] | None]:
    """The backbones to run (`auto`: every one whose weights are here, besides those named) and, when auto has a
    head row, the parts its choice picks from; if a pretrained method is asked for, every weight loads offline."""
    from featpipe.backbone import offline_error

    specs = [registry.resolve(name) for name in cfg.backbones if name != feature_sets.AUTO]
    auto_parts = feature_sets.parts(feature_sets.AUTO) if feature_sets.AUTO in cfg.backbones else None
    named = {s.name for s in specs}
    specs += [registry.resolve(p) for p in auto_parts or () if not p.endswith(feature_sets.FLIP) and p not in named]
    if {"head", "finetune"} & set(cfg.methods):
        for spec in specs:
            if not spec.weights_available():
                hint = spec.install_hint or (f"run `featpipe extract --backbone {spec.name}` once with network "
                                             f"access to cache them")
                raise offline_error(spec, "not packaged, not in torch's hub cache",
                                    f"{hint}, or leave it out of --backbones")
    if not specs:
        raise UserError("--backbones auto found no backbone whose weights are on this machine")
    return specs, auto_parts if "head" in cfg.methods else None
