"""The network that fine-tune and scratch train: a backbone with a head on uint8 NHWC input, the surgery that
freezes all but its last blocks, the crops it sees, and the bundle it is saved as."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn
from torchvision.transforms import v2

from featpipe.backbone import Backbone
from featpipe.decode import crop_corner
from featpipe.errors import UserError
from featpipe.heads import Head


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
def recalibrate_batchnorm(model: Classifier, batches: Iterable[torch.Tensor], device: torch.device,
                          precision: str) -> None:
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
    for crops in batches:  # uint8 NHWC crops of the training images
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(crops.to(device))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum


def save_bundle(model: Classifier, out: Path, weights_sha256: str, classes: list[str], data: dict, metrics: dict,
                params: dict) -> Path:
    """The trained backbone (full state dict) + its head (Head.from_torch_module: as_torch_module() puts back the
    same layers that were trained)."""
    from featpipe.bundle import Bundle, save

    spec = model.backbone.spec
    state = {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}
    bundle = Bundle(backbone=spec.name, weights_sha256=weights_sha256, preprocessing=spec.preprocessing,
                    classes=classes, head=Head.from_torch_module(model.head, params), metrics=metrics, data=data,
                    finetuned=True)
    return save(bundle, out, backbone_state=state)
