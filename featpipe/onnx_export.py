"""`featpipe export MODEL --format onnx`: a model bundle as one ONNX graph that onnxruntime runs without featpipe
or torch. Input `images`: uint8 (N, crop, crop, 3) RGB, already resized (shorter side to `resize`) and centre-
cropped as the bundle's preprocessing says; normalisation, backbone, head and softmax are inside; output
`probabilities` (N, classes). The class names and the preprocessing are in the model's metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from featpipe import bundle as B
from featpipe.errors import UserError
from featpipe.feature_sets import FLIP
from featpipe.predict import backbone_for

OPSET = 18


def export_onnx(model: Path, out: Path | None = None, weights: Path | None = None) -> dict:
    try:
        import onnx
    except ImportError:
        raise UserError("featpipe export --format onnx needs onnx: pip install 'featpipe[onnx]'") from None
    bundle = B.load(model)
    if bundle.more or bundle.tta != "none":  # one graph, one crop size, no mirror pass: not these yet
        parts = "+".join(b.backbone + (FLIP if b.tta == "flip" else "") for b in bundle.split())
        raise UserError(f"model bundle {bundle.path} reads {parts}; ONNX export takes one backbone without "
                        f"--tta for now (featpipe predict runs it)")
    out = Path(out) if out is not None else Path(bundle.path) / "model.onnx"
    if out.is_dir() or not out.parent.is_dir():
        raise UserError(f"--out {out}: " + ("is a folder" if out.is_dir() else f"folder {out.parent} does not exist"))
    net = Probabilities(backbone_for(bundle, weights), bundle.head.as_torch_module()).eval()
    crop = bundle.preprocessing.crop
    example = torch.zeros((2, crop, crop, 3), dtype=torch.uint8)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        torch.onnx.export(net, (example,), str(tmp), input_names=["images"], output_names=["probabilities"],
                          dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, opset_version=OPSET,
                          dynamo=True, verbose=False, external_data=False)
        graph = onnx.load(str(tmp))
        onnx.helper.set_model_props(graph, {"featpipe_classes": json.dumps(bundle.classes),
                                            "featpipe_preprocessing": bundle.preprocessing.to_json(),
                                            "featpipe_backbone": bundle.backbone})
        onnx.checker.check_model(graph)
        onnx.save(graph, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"model": str(bundle.path), "format": "onnx", "file": str(out), "classes": bundle.classes,
            "input": {"name": "images", "dtype": "uint8", "shape": ["batch", crop, crop, 3]},
            "output": {"name": "probabilities", "shape": ["batch", len(bundle.classes)]}, "opset": OPSET,
            "bytes": out.stat().st_size}


class Probabilities(torch.nn.Module):
    """uint8 NHWC -> softmax(head(backbone(x))): what `featpipe predict` computes, as one module."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(self.backbone(images)), dim=1)
