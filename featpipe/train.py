"""Fine-tune the last blocks of a pretrained backbone (head warm-started), or train the same network from scratch.

Every image is decoded once, through the extractor's Pillow path, into a uint8 square of side `resize` (the
shorter side the backbone's preprocessing resizes to) and kept in memory; each training batch is augmented on
tensors (RandomResizedCrop + horizontal flip), so an epoch costs only the network. Validation images are also
decoded once more with the backbone's own preprocessing (`pil_decode`), the extractor's exact pixels: fine-tune,
scratch and the cached-feature head are scored on identical inputs.
All three use featpipe.splits.val_split on the same path-sorted member list, so they are scored on the same images.
"""

from __future__ import annotations

import copy
import hashlib
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
from featpipe.backbone import Backbone, load
from featpipe.dataset import ImageFile, read_file
from featpipe.decode import PilDecoder, crop_corner, probe
from featpipe.embed import configure_cpu, resolve_device, resolve_precision
from featpipe.errors import UserError
from featpipe.extract import DEFAULT_CACHE_DIR, DEVICES
from featpipe.features import class_counts, find_duplicates
from featpipe.heads import Head, HeadConfig, fit_head
from featpipe.preprocess import Preprocessing
from featpipe.splits import Split, content_groups, val_split


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
        HeadConfig(self.head)
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


def decode_images(paths: list[str], labels: np.ndarray, classes: list[str], pre: Preprocessing,
                  val_fraction: float, seed: int) -> Images:
    """Decode each file once at (resize x resize); files Pillow cannot decode are dropped (reported on stderr)."""
    t0 = time.perf_counter()
    square = Preprocessing(pre.resize, pre.resize, pre.mean, pre.std, pre.interpolation)
    decoder = PilDecoder(square)
    results = list(decoder.pool.map(lambda p: _decode_file(decoder, p), paths))
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
    crop = PilDecoder(pre)
    val = [r for _, r in crop.pool.map(lambda i: _decode_file(crop, kept[i]), split.val)]
    if any(isinstance(v, str) for v in val):
        raise UserError(f"a validation image changed while decoding: {next(v for v in val if isinstance(v, str))}")
    return Images(pixels, torch.from_numpy(y), classes, kept, groups, split, pre.crop,
                  torch.from_numpy(np.stack(val)).reshape(-1, pre.crop, pre.crop, 3),
                  round(time.perf_counter() - t0, 4))


def _decode_file(decoder: PilDecoder, path: str) -> tuple[str, np.ndarray | str]:
    """(sha256 of the bytes, the square uint8 image or why not: unreadable, not an image, too large, corrupt);
    never an exception. The hash groups identical files for the split, as the cache's row key does."""
    data, err = read_file(ImageFile(Path(path), ""))
    if err:
        return "", err
    return hashlib.sha256(data).hexdigest(), probe(data).skip_reason or decoder.decode_one(data)


def scan_images(cfg: TrainConfig) -> Images:
    """The data dir's decodable images in path order, as featpipe.features orders its rows (same split)."""
    from featpipe.dataset import require_every_class, scan

    root, files, classes = scan(cfg.data_dir)
    files = sorted(files, key=lambda f: str(f.path))
    labels = np.array([classes.index(f.label) for f in files], dtype=np.int64)
    images = decode_images([str(f.path) for f in files], labels, classes,
                           registry.resolve(cfg.backbone).preprocessing, cfg.val_fraction, cfg.seed)
    require_every_class(root, classes, {classes[i] for i in images.y.tolist()})
    find_duplicates(images.paths, [classes[i] for i in images.y.tolist()], images.groups).report()
    return images


class Classifier(nn.Module):
    """Backbone + head on uint8 NHWC input.

    With `trainable` given (fine-tuning), train() puts only those blocks and the head in training mode: frozen
    blocks must not update BatchNorm running statistics or apply dropout. BatchNorm inside the unfrozen blocks stays
    in inference mode too, as in the tutorial (`training=False`): batches of 32 from a few classes would overwrite
    ImageNet statistics with noisy ones; its scale and shift still train.
    """

    def __init__(self, backbone: Backbone, head: nn.Module, trainable: list[nn.Module] | None = None):
        super().__init__()
        self.backbone, self.head, self.trainable = backbone, head, trainable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if mode and self.trainable is not None:
            self.backbone.eval()
            for block in self.trainable:
                block.train()
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def freeze_all_but_last(backbone: Backbone, n: int) -> list[nn.Module]:
    """requires_grad only for the last n blocks; returns them."""
    blocks = backbone.blocks()
    if n > len(blocks):
        raise UserError(f"--unfreeze-blocks {n}: {backbone.spec.name} has only {len(blocks)} blocks")
    for p in backbone.parameters():
        p.requires_grad_(False)
    for block in blocks[-n:]:
        for p in block.parameters():
            p.requires_grad_(True)
    return blocks[-n:]


def augment(batch: torch.Tensor, transform: v2.Transform) -> torch.Tensor:
    """uint8 NHWC squares -> uint8 NHWC crops, each image with its own random crop and flip."""
    return torch.stack([transform(img.permute(2, 0, 1)) for img in batch]).permute(0, 2, 3, 1)


def centre(batch: torch.Tensor, crop: int) -> torch.Tensor:
    top, left = crop_corner(batch.shape[1], batch.shape[2], crop)
    return batch[:, top:top + crop, left:left + crop]


@torch.inference_mode()
def predict(model: nn.Module, crops: torch.Tensor, device: torch.device, precision: str) -> np.ndarray:
    """Class indices for uint8 NHWC crops, in eval mode."""
    model.eval()
    preds = []
    for start in range(0, len(crops), 64):
        x = crops[start:start + 64].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            preds.append(model(x).argmax(1).cpu())
    return torch.cat(preds).numpy()


@torch.no_grad()
def recalibrate_batchnorm(model: Classifier, crops: torch.Tensor, device: torch.device, precision: str) -> None:
    """Exact BatchNorm statistics over the training images ("precise BN") before evaluating a scratch model.

    After a few dozen steps, momentum-averaged running statistics still mostly hold their initial 0/1 values, so a
    scratch model in eval mode predicts one class whatever it has learned; the baseline would look worse than it is.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch below
    model.train()
    for start in range(0, len(crops), 64):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(crops[start:start + 64].to(device))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum


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


def _runtime(cfg: TrainConfig, seed_offset: int) -> tuple[torch.device, str]:
    configure_cpu()
    torch.manual_seed(cfg.seed + seed_offset)
    device = resolve_device(cfg.device)
    return device, resolve_precision("auto", device)


def _result(method: str, model: Classifier, images: Images, cfg: TrainConfig, device: torch.device, precision: str,
            best_epoch: int, seconds: float, history: list[dict], hyper: dict) -> TrainResult:
    tr, va = images.split.train, images.split.val
    y = images.y.numpy()
    val_pred = predict(model, images.val_pixels, device, precision)
    train_acc = float((predict(model, centre(images.pixels[tr], images.crop), device, precision) == y[tr]).mean())
    params = list(model.parameters())
    return TrainResult(
        method, model.backbone.spec.name, round(train_acc, 4), round(float((val_pred == y[va]).mean()), 4),
        round(seconds, 2), best_epoch, len([h for h in history if h["epoch"] > 0]), history,
        sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params), hyper, str(device),
        precision, len(tr), len(va), class_counts(y, images.classes), val_pred=val_pred)


def finetune(cfg: TrainConfig, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
             features=None, images: Images | None = None) -> TrainResult:
    """Pretrained backbone + a head (cfg.head) fitted on the cached training-split features, then the last
    `unfreeze_blocks` blocks and the head trained together (backbone at lr_backbone, head at lr_head).

    `features`/`images` let `featpipe experiment` share one extraction and one decode across methods."""
    from featpipe.bundle import output_dir
    from featpipe.extract import ExtractConfig
    from featpipe.features import load_features

    spec = registry.resolve(cfg.backbone)
    out = output_dir(cfg.out, f"{spec.name}-finetuned", cfg.data_dir, cfg.force)
    features = features or load_features(ExtractConfig(cfg.data_dir, cfg.backbone, cfg.cache_dir, cfg.device))
    images = images or decode_images(features.paths, features.y, features.classes, spec.preprocessing,
                                     cfg.val_fraction, cfg.seed)
    if images.paths != features.paths:
        raise UserError("Pillow could not decode every cached image; remove the files listed above and rerun")
    device, precision = _runtime(cfg, 0)
    t0 = time.perf_counter()
    tr = images.split.train
    head = fit_head(features.X, features.y, len(features.classes), HeadConfig(cfg.head, cfg.seed), features.groups,
                    rows=tr)
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
    res = _result("finetune", model, images, cfg, device, precision, best_epoch, seconds + head_seconds, history,
                  hyper)
    res.model_path = str(save_bundle(model, res, out, features.result.cache.key.weights_sha256, features.classes,
                                     features.data(), {"finetuned": True}))
    return res


def save_bundle(model: Classifier, res: TrainResult, out: Path, weights_sha256: str, classes: list[str],
                data: dict, params: dict) -> Path:
    """The trained backbone (full state dict) + its head (Head.from_torch_module: as_torch_module() puts back the
    same layers that were trained)."""
    from featpipe.bundle import Bundle, save

    spec = model.backbone.spec
    metrics = {k: getattr(res, k) for k in ("train_accuracy", "val_accuracy", "train_seconds", "best_epoch",
                                            "n_train", "n_val")} | res.hyperparameters
    state = {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}
    return save(Bundle(spec.name, weights_sha256, spec.preprocessing, classes, Head.from_torch_module(model.head,
                       params), metrics, data=data, finetuned=True), out, backbone_state=state)


def scratch(cfg: TrainConfig, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
            images: Images | None = None) -> TrainResult:
    """The same architecture from random init with a new linear head, every layer trained at lr_head: the
    tutorial's "before". Needs no pretrained weights and no extraction; saves a bundle."""
    from featpipe.bundle import output_dir
    from featpipe.dataset import describe

    spec = registry.resolve(cfg.backbone)
    out = output_dir(cfg.out, f"{spec.name}-scratch", cfg.data_dir, cfg.force)
    images = images or scan_images(cfg)
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
    res = _result("scratch", model, images, cfg, device, precision, best_epoch, seconds, history, hyper)
    # no pretrained weights: "random-init"; every weight is in backbone.safetensors, so predict loads it as it
    # loads a fine-tuned bundle
    data = {"dir": describe(cfg.data_dir), "class_counts": res.class_counts}
    res.model_path = str(save_bundle(model, res, out, "random-init", images.classes, data, {"scratch": True}))
    return res
