"""Fine-tune the last blocks of a pretrained backbone (head warm-started), or train the same network from scratch:
the epochs (augmented batches streamed from train_images.Images, early stopping on val accuracy, a checkpoint per
epoch for --resume) and what they report.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torchvision.transforms import v2

from featpipe import registry
from featpipe.backbone import load
from featpipe.checkpoint import Checkpoint
from featpipe.classifier import (Classifier, augment, centre, freeze_all_but_last, predict, recalibrate_batchnorm,
                                 save_bundle)
from featpipe.errors import UserError
from featpipe.extract import DEFAULT_CACHE_DIR, DEVICES, ExtractConfig
from featpipe.features import class_counts
from featpipe.heads import HeadConfig, fit_head
from featpipe.runtime import prepare
from featpipe.tar_input import is_shard
from featpipe.splits import check_seed
from featpipe.held_out import Arranged, arrange, check_folders
from featpipe.train_images import Images, scan_images, split_images, stream


@dataclass
class TrainConfig:
    data_dir: Path | None = None
    backbone: str = "mobilenet_v2"
    cache_dir: Path = DEFAULT_CACHE_DIR
    device: str = "auto"
    epochs: int = 3  # an upper bound: early stopping ends sooner when val accuracy stalls
    unfreeze_blocks: int = 3  # fine-tune only: the last N of Backbone.blocks()
    lr_head: float = 1e-3  # fine-tune: the warm-started head; scratch: every layer
    lr_backbone: float = 1e-4  # fine-tune: the unfrozen blocks, 10x below the head so they move gently
    weight_decay: float = 1e-4
    batch_size: int = 32
    patience: int = 3  # epochs without a new best val accuracy before stopping
    min_scale: float = 0.35  # RandomResizedCrop's smallest area share: tiny data, few epochs, keep objects in view
    val_fraction: float = 0.2
    seed: int = 0
    out: Path | None = None  # bundle dir (default models/<backbone>-finetuned, or -scratch)
    head: str = "logistic"  # fine-tune: the warm-started head's kind (heads.KINDS)
    force: bool = False  # replace a bundle at `out` trained on another data dir
    resume: bool = False  # go on from `out`/checkpoint.pt, the last epoch a killed run finished
    val_dir: Path | None = None  # fine-tune: a validation folder instead of the random split
    test_dir: Path | None = None  # fine-tune: scored once at the end, never used to choose the epoch
    labels: Path | None = None  # a CSV/Parquet of paths and labels (optional split column) instead of class folders

    def __post_init__(self) -> None:
        if self.data_dir is not None and is_shard(self.data_dir):
            raise UserError(f"{self.data_dir}: finetune and scratch read image files as they train; WebDataset "
                            f"shards go to extract, fit-head, export-embeddings and audit")
        if self.device not in DEVICES:
            raise UserError(f"--device must be one of {', '.join(DEVICES)} (got {self.device!r})")
        HeadConfig(kind=self.head)
        check_seed(self.seed)
        for flag, value in (("--epochs", self.epochs), ("--unfreeze-blocks", self.unfreeze_blocks),
                            ("--batch-size", self.batch_size), ("--patience", self.patience)):
            if value < 1:
                raise UserError(f"{flag} must be at least 1 (got {value})")
        for name in ("lr_head", "lr_backbone"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be positive (got {getattr(self, name)})")
        if not self.weight_decay >= 0:
            raise UserError(f"weight_decay must be at least 0 (got {self.weight_decay})")
        if not 0.0 < self.min_scale <= 1.0:
            raise UserError(f"min_scale must be in (0, 1]: the smallest crop's share of the image (got "
                            f"{self.min_scale})")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in (0, 1) for training: early stopping needs a validation "
                            f"share (got {self.val_fraction})")

    def extract_config(self) -> ExtractConfig:
        """The extraction whose cached features fine-tuning warm-starts from."""
        return ExtractConfig(data_dir=self.data_dir, backbone=self.backbone, cache_dir=self.cache_dir,
                             device=self.device, labels=self.labels)


@dataclass
class TrainResult:
    method: str  # "finetune" | "scratch"
    backbone: str
    train_accuracy: float  # best checkpoint, centre-cropped training images (no augmentation)
    val_accuracy: float
    train_seconds: float  # the epochs (and the warm-start head fit): not extraction, not the one-time decode
    best_epoch: int
    epochs_run: int
    history: list[dict]  # per epoch: train_loss, train_accuracy (augmented batches), val_accuracy, seconds
    trainable_params: int
    total_params: int
    hyperparameters: dict
    device: str
    precision: str
    n_train: int
    n_val: int
    class_counts: dict[str, int]
    validation: str  # which images validated: held_out.Arranged.validation
    model_path: str | None = None
    test: dict = field(default_factory=dict)  # test_accuracy, n_test, test_in_train, when a test set was given
    val_pred: np.ndarray | None = field(default=None, repr=False)  # for the confusion matrix

    def to_json(self) -> dict:
        d = asdict(self)
        del d["val_pred"], d["test"]
        return d | self.test


def fit(model: Classifier, groups: list[dict], images: Images, cfg: TrainConfig, device: torch.device,
        precision: str, log: Callable[[str], None], history: list[dict], ckpt: Checkpoint,
        state: dict | None) -> tuple[int, float]:
    """Epochs with early stopping on val accuracy, a checkpoint after each (from `state`, a resumed run's, it goes
    on after the last finished one); the best checkpoint is restored. Returns (best epoch, seconds)."""
    transform = v2.Compose([v2.RandomResizedCrop(images.crop, scale=(cfg.min_scale, 1.0), antialias=True),
                            v2.RandomHorizontalFlip()])
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    y_val = images.y[images.split.val]
    best = max(history, key=lambda h: h["val_accuracy"]) if history else {"epoch": 0, "val_accuracy": -1.0}
    best_state, best_epoch, seconds, first = copy.deepcopy(model.state_dict()), best["epoch"], 0.0, 1
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        best_state, best_epoch, seconds, first = state["best_state"], state["best_epoch"], state["seconds"], \
            state["epoch"] + 1
        best = next((h for h in history if h["epoch"] == best_epoch), best)
        torch.set_rng_state(state["rng"])
        if state["epoch"] > cfg.epochs:
            raise UserError(f"the checkpoint in {ckpt.path.parent} has {state['epoch']} epochs done, more than "
                            f"--epochs {cfg.epochs}: pass --epochs {state['epoch']} or more")
        log(f"  resumed after epoch {state['epoch']} (best so far: epoch {best_epoch})")
        if state["epoch"] - best_epoch >= cfg.patience:  # it had stopped early; only its bundle was not written
            first = cfg.epochs + 1
    for epoch in range(first, cfg.epochs + 1):
        t0 = time.perf_counter()
        loss, acc = _epoch(model, opt, transform, images, cfg, device, precision)
        if model.trainable is None:  # scratch: BatchNorm learns its statistics too
            recalibrate_batchnorm(model, (centre(b, images.crop) for _, b in images.squares(images.split.train, 64)),
                                  device, precision)
        val_acc = float((_scored(model, images.crops(images.split.val), device, precision)[1] == y_val).mean())
        elapsed = time.perf_counter() - t0
        seconds += elapsed
        history.append({"epoch": epoch, "train_loss": round(loss, 4), "train_accuracy": round(acc, 4),
                        "val_accuracy": round(val_acc, 4), "seconds": round(elapsed, 2)})
        log(f"  epoch {epoch}: train loss {loss:.3f}, train acc {acc:.3f}, val acc {val_acc:.3f} ({elapsed:.1f} s)")
        if history[-1]["val_accuracy"] > best["val_accuracy"]:  # both rounded alike: a tie keeps the earlier
            best, best_state, best_epoch = history[-1], copy.deepcopy(model.state_dict()), epoch
        ckpt.save({"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                   "best_state": best_state, "best_epoch": best_epoch, "seconds": seconds, "history": history,
                   "rng": torch.get_rng_state()})
        if epoch - best_epoch >= cfg.patience and epoch < cfg.epochs:
            log(f"  early stop: no better val accuracy for {cfg.patience} epochs")
            break
    model.load_state_dict(best_state)
    return best_epoch, seconds


def _epoch(model: Classifier, opt: torch.optim.Optimizer, transform: v2.Transform, images: Images, cfg: TrainConfig,
           device: torch.device, precision: str) -> tuple[float, float]:
    """One pass over the training split in a fresh random order: (mean loss, accuracy on the augmented batches)."""
    model.train()
    train = images.split.train
    total_loss, correct, seen = 0.0, 0, 0
    for idx, batch in images.squares(train[torch.randperm(len(train)).numpy()], cfg.batch_size):
        x, y = augment(batch, transform).to(device), torch.from_numpy(images.y[idx]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total_loss += loss.item() * len(idx)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(idx)
    if not seen:
        raise UserError("no training image decodes any more (listed above)")
    return total_loss / seen, correct / seen


def _scored(model: Classifier, batches, device: torch.device, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """(indices, predicted classes) over (indices, uint8 crops) batches."""
    idx, pred = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for i, b in batches:
        idx.append(i)
        pred.append(predict(model, b, device, precision))
    return np.concatenate(idx), np.concatenate(pred)


def _result(method: str, model: Classifier, images: Images, device: torch.device, precision: str,
            best_epoch: int, seconds: float, history: list[dict], hyper: dict, held: Arranged | None) -> TrainResult:
    tr, va = images.split.train, images.split.val
    y = images.y
    val_pred = _scored(model, images.crops(va), device, precision)[1]
    seen, pred = _scored(model, ((i, centre(b, images.crop)) for i, b in images.squares(tr, 64)), device, precision)
    test = {}
    if held is not None and held.test is not None:  # once, with the chosen epoch's weights
        t = held.test
        crops = stream(t.paths, np.arange(len(t.y)), 64, images.pre, True, images.decoder, images.cuda)
        got = _scored(model, crops, device, precision)
        test = held.test_report(float((got[1] == t.y).mean()))
    params = list(model.parameters())
    return TrainResult(
        method=method, backbone=model.backbone.spec.name, train_accuracy=round(float((pred == y[seen]).mean()), 4),
        val_accuracy=round(float((val_pred == y[va]).mean()), 4), train_seconds=round(seconds, 2),
        best_epoch=best_epoch, epochs_run=len([h for h in history if h["epoch"] > 0]), history=history,
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params), hyperparameters=hyper, device=str(device), precision=precision,
        n_train=len(tr), n_val=len(va), class_counts=class_counts(y, images.classes), val_pred=val_pred, test=test,
        validation=images.validation)


def bundle_dir(cfg: TrainConfig, method: str) -> Path:
    """--out, else models/<backbone>-finetuned (or -scratch); a bundle there from another data dir is refused
    (without --force) before any work, so the command layer calls this before extracting."""
    from featpipe.bundle import output_dir

    suffix = "finetuned" if method == "finetune" else "scratch"
    return output_dir(cfg.out, f"{registry.resolve(cfg.backbone).name}-{suffix}", cfg.data_dir, cfg.force)


def _runtime(cfg: TrainConfig, seed_offset: int) -> tuple[torch.device, str]:
    torch.manual_seed(cfg.seed + seed_offset)  # fine-tune and scratch draw different, reproducible streams
    return prepare(cfg.device)


def _fingerprint(cfg: TrainConfig, method: str, images: Images) -> dict:
    """What a resumed run must share with the killed one: the files, their bytes and labels, the method and its
    settings (plain values: checkpoints load with torch's weights_only)."""
    from featpipe.dataset import describe

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                if k not in ("data_dir", "cache_dir", "device", "epochs", "patience", "out", "force", "resume")}
    return {"method": method, "data": describe(cfg.data_dir), "classes": images.classes, "files": images.content,
            **settings}


def _save(model: Classifier, res: TrainResult, out: Path, weights_sha256: str, classes: list[str], data: dict,
          params: dict) -> str:
    metrics = {k: getattr(res, k) for k in ("train_accuracy", "val_accuracy", "train_seconds", "best_epoch",
                                            "n_train", "n_val", "validation")} | res.test | res.hyperparameters
    return str(save_bundle(model, out, weights_sha256, classes, data, metrics, params))


def training_data(cfg: TrainConfig) -> Arranged:
    """Fine-tune's data: the held-out folders checked, the cache completed, the rows arranged into train and val
    (and test): a random split, --val-dir, or the --labels split column (held_out.py)."""
    from featpipe.features import load_features

    extract = cfg.extract_config()
    check_folders(extract, cfg.val_dir, cfg.test_dir)
    return arrange(load_features(extract), extract, cfg.val_dir, cfg.test_dir, cfg.val_fraction, cfg.seed,
                   val_needed=True)


def finetune(cfg: TrainConfig, held: Arranged, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
             images: Images | None = None) -> TrainResult:
    """Pretrained backbone + a head (cfg.head) fitted on the cached training-split features, then the last
    `unfreeze_blocks` blocks and the head trained together (backbone at lr_backbone, head at lr_head).

    `held`: the cached rows, arranged (training_data); `images` lets `featpipe experiment` share one file list and
    split across methods."""
    spec = registry.resolve(cfg.backbone)
    out = bundle_dir(cfg, "finetune")
    features = held.features
    images = images or split_images(features.paths, features.y, features.classes, features.sha256, features.groups,
                                    spec.preprocessing, cfg.val_fraction, cfg.seed, given=(held.split, held.validation))
    device, precision = _runtime(cfg, 0)
    images.cuda = device.index if device.type == "cuda" else None  # batches decode where the model runs
    ckpt = Checkpoint(out, _fingerprint(cfg, "finetune", images), cfg.resume)
    state = ckpt.load()
    t0 = time.perf_counter()
    head = fit_head(features.X, features.y, len(features.classes), HeadConfig(kind=cfg.head, seed=cfg.seed),
                    features.groups, rows=images.split.train)
    head_seconds = time.perf_counter() - t0
    loaded = load(spec)
    trainable = freeze_all_but_last(loaded.model, cfg.unfreeze_blocks)
    model = Classifier(loaded.model, head.as_torch_module(), trainable).to(device)
    groups = [{"params": [p for p in loaded.model.parameters() if p.requires_grad], "lr": cfg.lr_backbone},
              {"params": list(model.head.parameters()), "lr": cfg.lr_head}]
    if state:
        history = state["history"]
    else:
        pred = _scored(model, images.crops(images.split.val), device, precision)[1]
        history = [{"epoch": 0, "train_loss": None, "train_accuracy": None,
                    "val_accuracy": round(float((pred == images.y[images.split.val]).mean()), 4),
                    "seconds": round(head_seconds, 2)}]
    log(f"finetune {spec.name}: warm-start head val acc {history[0]['val_accuracy']:.3f}; training the last "
        f"{cfg.unfreeze_blocks} blocks (lr {cfg.lr_backbone:g}) and the head (lr {cfg.lr_head:g})")
    best_epoch, seconds = fit(model, groups, images, cfg, device, precision, log, history, ckpt, state)
    hyper = {"unfreeze_blocks": cfg.unfreeze_blocks, "lr_backbone": cfg.lr_backbone, "lr_head": cfg.lr_head,
             "optimizer": "AdamW", "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
             "epochs": cfg.epochs, "patience": cfg.patience, "warm_start": {"head": head.kind, **head.params},
             "augmentation": f"RandomResizedCrop({images.crop}, scale=({cfg.min_scale}, 1)) + HorizontalFlip",
             "batchnorm": "inference mode (running statistics frozen)"}
    res = _result("finetune", model, images, device, precision, best_epoch, seconds + head_seconds, history, hyper,
                  held)
    res.model_path = _save(model, res, out, features.result.cache.key.weights_sha256, features.classes,
                           features.data(), {"finetuned": True})
    ckpt.remove()
    return res


def scratch(cfg: TrainConfig, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
            images: Images | None = None, held: Arranged | None = None) -> TrainResult:
    """The same architecture from random init with a new linear head, every layer trained at lr_head: the
    tutorial's "before". Needs no pretrained weights and no extraction; saves a bundle. `images` and `held`: the
    experiment's shared split and test set."""
    from featpipe.dataset import describe

    spec = registry.resolve(cfg.backbone)
    out = bundle_dir(cfg, "scratch")
    images = images or scan_images(cfg.data_dir, cfg.backbone, cfg.val_fraction, cfg.seed, cfg.labels)
    device, precision = _runtime(cfg, 1)
    images.cuda = device.index if device.type == "cuda" else None
    ckpt = Checkpoint(out, _fingerprint(cfg, "scratch", images), cfg.resume)
    state = ckpt.load()
    backbone = load(spec, pretrained=False).model
    model = Classifier(backbone, nn.Linear(spec.dim, len(images.classes))).to(device)
    log(f"scratch {spec.name}: random init, every layer trained (lr {cfg.lr_head:g})")
    history: list[dict] = state["history"] if state else []
    best_epoch, seconds = fit(model, [{"params": list(model.parameters()), "lr": cfg.lr_head}], images, cfg, device,
                              precision, log, history, ckpt, state)
    hyper = {"lr": cfg.lr_head, "optimizer": "AdamW", "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
             "epochs": cfg.epochs, "patience": cfg.patience, "init": "random",
             "augmentation": f"RandomResizedCrop({images.crop}, scale=({cfg.min_scale}, 1)) + HorizontalFlip",
             "batchnorm": "training mode"}
    res = _result("scratch", model, images, device, precision, best_epoch, seconds, history, hyper, held)
    # no pretrained weights: "random-init"; every weight is in backbone.safetensors, so predict loads it as it
    # loads a fine-tuned bundle
    data = {"dir": describe(cfg.data_dir), "class_counts": res.class_counts}
    res.model_path = _save(model, res, out, "random-init", images.classes, data, {"scratch": True})
    ckpt.remove()
    return res
