"""Fine-tune the last blocks of a pretrained backbone (head warm-started), or train the same network from scratch:
the epochs (augmented batches from train_images.Images, early stopping on val accuracy) and what they report.
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
from featpipe.classifier import (Classifier, augment, centre, freeze_all_but_last, predict, recalibrate_batchnorm,
                                 save_bundle)
from featpipe.errors import UserError
from featpipe.extract import DEFAULT_CACHE_DIR, DEVICES, ExtractConfig
from featpipe.features import Features, class_counts
from featpipe.heads import HeadConfig, fit_head
from featpipe.runtime import prepare
from featpipe.train_images import Images, decode_images, scan_images


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

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise UserError(f"--device must be one of {', '.join(DEVICES)} (got {self.device!r})")
        HeadConfig(kind=self.head)
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
                             device=self.device)


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
    model_path: str | None = None
    val_pred: np.ndarray | None = field(default=None, repr=False)  # for the confusion matrix

    def to_json(self) -> dict:
        d = asdict(self)
        del d["val_pred"]
        return d


def fit(model: Classifier, groups: list[dict], images: Images, cfg: TrainConfig, device: torch.device,
        precision: str, log: Callable[[str], None], history: list[dict]) -> tuple[int, float]:
    """Epochs with early stopping on val accuracy; the best checkpoint is restored. Returns (best epoch, seconds)."""
    transform = v2.Compose([v2.RandomResizedCrop(images.crop, scale=(cfg.min_scale, 1.0), antialias=True),
                            v2.RandomHorizontalFlip()])
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    train_idx = images.split.train
    y_val = images.y.numpy()[images.split.val]
    best = max(history, key=lambda h: h["val_accuracy"]) if history else {"epoch": 0, "val_accuracy": -1.0}
    best_state, best_epoch = copy.deepcopy(model.state_dict()), best["epoch"]
    seconds = 0.0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = train_idx[torch.randperm(len(train_idx)).numpy()]
        total_loss, correct = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            x, y = augment(images.pixels[idx], transform).to(device), images.y[idx].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        if model.trainable is None:  # scratch: BatchNorm learns its statistics too
            recalibrate_batchnorm(model, centre(images.pixels[train_idx], images.crop), device, precision)
        val_acc = float((predict(model, images.val_pixels, device, precision) == y_val).mean())
        elapsed = time.perf_counter() - t0
        seconds += elapsed
        history.append({"epoch": epoch, "train_loss": round(total_loss / len(order), 4),
                        "train_accuracy": round(correct / len(order), 4), "val_accuracy": round(val_acc, 4),
                        "seconds": round(elapsed, 2)})
        log(f"  epoch {epoch}: train loss {total_loss / len(order):.3f}, train acc {correct / len(order):.3f}, "
            f"val acc {val_acc:.3f} ({elapsed:.1f} s)")
        if val_acc > best["val_accuracy"]:
            best, best_state, best_epoch = history[-1], copy.deepcopy(model.state_dict()), epoch
        elif epoch - best_epoch >= cfg.patience and epoch < cfg.epochs:
            log(f"  early stop: no better val accuracy for {cfg.patience} epochs")
            break
    model.load_state_dict(best_state)
    return best_epoch, seconds


def _result(method: str, model: Classifier, images: Images, device: torch.device, precision: str,
            best_epoch: int, seconds: float, history: list[dict], hyper: dict) -> TrainResult:
    tr, va = images.split.train, images.split.val
    y = images.y.numpy()
    val_pred = predict(model, images.val_pixels, device, precision)
    train_acc = float((predict(model, centre(images.pixels[tr], images.crop), device, precision) == y[tr]).mean())
    params = list(model.parameters())
    return TrainResult(
        method=method, backbone=model.backbone.spec.name, train_accuracy=round(train_acc, 4),
        val_accuracy=round(float((val_pred == y[va]).mean()), 4), train_seconds=round(seconds, 2),
        best_epoch=best_epoch, epochs_run=len([h for h in history if h["epoch"] > 0]), history=history,
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params), hyperparameters=hyper, device=str(device), precision=precision,
        n_train=len(tr), n_val=len(va), class_counts=class_counts(y, images.classes), val_pred=val_pred)


def bundle_dir(cfg: TrainConfig, method: str) -> Path:
    """--out, else models/<backbone>-finetuned (or -scratch); a bundle there from another data dir is refused
    (without --force) before any work, so the command layer calls this before extracting."""
    from featpipe.bundle import output_dir

    suffix = "finetuned" if method == "finetune" else "scratch"
    return output_dir(cfg.out, f"{registry.resolve(cfg.backbone).name}-{suffix}", cfg.data_dir, cfg.force)


def _runtime(cfg: TrainConfig, seed_offset: int) -> tuple[torch.device, str]:
    torch.manual_seed(cfg.seed + seed_offset)  # fine-tune and scratch draw different, reproducible streams
    return prepare(cfg.device)


def _save(model: Classifier, res: TrainResult, out: Path, weights_sha256: str, classes: list[str], data: dict,
          params: dict) -> str:
    metrics = {k: getattr(res, k) for k in ("train_accuracy", "val_accuracy", "train_seconds", "best_epoch",
                                            "n_train", "n_val")} | res.hyperparameters
    return str(save_bundle(model, out, weights_sha256, classes, data, metrics, params))


def finetune(cfg: TrainConfig, features: Features, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
             images: Images | None = None) -> TrainResult:
    """Pretrained backbone + a head (cfg.head) fitted on the cached training-split features, then the last
    `unfreeze_blocks` blocks and the head trained together (backbone at lr_backbone, head at lr_head).

    `features`: the data dir's cached rows (features.load_features); `images` lets `featpipe experiment` share one
    decode across methods."""
    spec = registry.resolve(cfg.backbone)
    out = bundle_dir(cfg, "finetune")
    images = images or decode_images(features.paths, features.y, features.classes, spec.preprocessing,
                                     cfg.val_fraction, cfg.seed)
    if images.paths != features.paths:
        raise UserError("Pillow could not decode every cached image; remove the files listed above and rerun")
    device, precision = _runtime(cfg, 0)
    t0 = time.perf_counter()
    tr = images.split.train
    head = fit_head(features.X, features.y, len(features.classes), HeadConfig(kind=cfg.head, seed=cfg.seed),
                    features.groups, rows=tr)
    head_seconds = time.perf_counter() - t0
    loaded = load(spec)
    trainable = freeze_all_but_last(loaded.model, cfg.unfreeze_blocks)
    model = Classifier(loaded.model, head.as_torch_module(), trainable).to(device)
    groups = [{"params": [p for p in loaded.model.parameters() if p.requires_grad], "lr": cfg.lr_backbone},
              {"params": list(model.head.parameters()), "lr": cfg.lr_head}]
    val_acc0 = float((predict(model, images.val_pixels, device, precision) ==
                      images.y.numpy()[images.split.val]).mean())
    history = [{"epoch": 0, "train_loss": None, "train_accuracy": None, "val_accuracy": round(val_acc0, 4),
                "seconds": round(head_seconds, 2)}]
    log(f"finetune {spec.name}: warm-start head val acc {val_acc0:.3f}; training the last {cfg.unfreeze_blocks} "
        f"blocks (lr {cfg.lr_backbone:g}) and the head (lr {cfg.lr_head:g})")
    best_epoch, seconds = fit(model, groups, images, cfg, device, precision, log, history)
    hyper = {"unfreeze_blocks": cfg.unfreeze_blocks, "lr_backbone": cfg.lr_backbone, "lr_head": cfg.lr_head,
             "optimizer": "AdamW", "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
             "epochs": cfg.epochs, "patience": cfg.patience, "warm_start": {"head": head.kind, **head.params},
             "augmentation": f"RandomResizedCrop({images.crop}, scale=({cfg.min_scale}, 1)) + HorizontalFlip",
             "batchnorm": "inference mode (running statistics frozen)"}
    res = _result("finetune", model, images, device, precision, best_epoch, seconds + head_seconds, history, hyper)
    res.model_path = _save(model, res, out, features.result.cache.key.weights_sha256, features.classes,
                           features.data(), {"finetuned": True})
    return res


def scratch(cfg: TrainConfig, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
            images: Images | None = None) -> TrainResult:
    """The same architecture from random init with a new linear head, every layer trained at lr_head: the
    tutorial's "before". Needs no pretrained weights and no extraction; saves a bundle."""
    from featpipe.dataset import describe

    spec = registry.resolve(cfg.backbone)
    out = bundle_dir(cfg, "scratch")
    images = images or scan_images(cfg.data_dir, cfg.backbone, cfg.val_fraction, cfg.seed)
    device, precision = _runtime(cfg, 1)
    backbone = load(spec, pretrained=False).model
    model = Classifier(backbone, nn.Linear(spec.dim, len(images.classes))).to(device)
    log(f"scratch {spec.name}: random init, every layer trained (lr {cfg.lr_head:g})")
    history: list[dict] = []
    best_epoch, seconds = fit(model, [{"params": list(model.parameters()), "lr": cfg.lr_head}], images, cfg, device,
                              precision, log, history)
    hyper = {"lr": cfg.lr_head, "optimizer": "AdamW", "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
             "epochs": cfg.epochs, "patience": cfg.patience, "init": "random",
             "augmentation": f"RandomResizedCrop({images.crop}, scale=({cfg.min_scale}, 1)) + HorizontalFlip",
             "batchnorm": "training mode"}
    res = _result("scratch", model, images, device, precision, best_epoch, seconds, history, hyper)
    # no pretrained weights: "random-init"; every weight is in backbone.safetensors, so predict loads it as it
    # loads a fine-tuned bundle
    data = {"dir": describe(cfg.data_dir), "class_counts": res.class_counts}
    res.model_path = _save(model, res, out, "random-init", images.classes, data, {"scratch": True})
    return res
