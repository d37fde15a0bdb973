"""`featpipe export MODEL --format onnx`: a model bundle as one ONNX graph that onnxruntime runs without featpipe
or torch. Input `images`: uint8 (N, crop, crop, 3) RGB, already resized (shorter side to `resize`) and centre-
cropped as the bundle's preprocessing says; normalisation, backbone, head and softmax are inside; output
`probabilities` (N, classes). The class names and the preprocessing are in the model's metadata. A bundle of several
backbones (feature_sets.py) takes one input per backbone, `images_0`, `images_1`, ..., each cropped as that
backbone's preprocessing says (`featpipe_parts` in the metadata); flip averaging runs inside the graph."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from featpipe import bundle as B
from featpipe.errors import UserError
from featpipe.predict import backbone_for, check_weights_apply

OPSET = 18


def export_onnx(model: Path, out: Path | None = None, weights: Path | None = None) -> dict:
    try:
        import onnx
    except ImportError:
        raise UserError("featpipe export --format onnx needs onnx: pip install 'featpipe[onnx]'") from None
    bundle = B.load(model)
    check_weights_apply(bundle, weights)
    out = Path(out) if out is not None else Path(bundle.path) / "model.onnx"
    if out.is_dir() or not out.parent.is_dir():
        raise UserError(f"--out {out}: " + ("is a folder" if out.is_dir() else f"folder {out.parent} does not exist"))
    parts = bundle.split()
    net = Probabilities([backbone_for(b, weights) for b in parts],
                        [b.tta == "flip" for b in parts],
                        bundle.head.as_torch_module()).eval()
    names = ["images"] if len(parts) == 1 else [f"images_{i}" for i in range(len(parts))]
    examples = tuple(torch.zeros((2, b.preprocessing.crop, b.preprocessing.crop, 3), dtype=torch.uint8)
                     for b in parts)
    tmp = out.with_name(f".{out.name}.tmp")
    batch = torch.export.Dim("batch")  # one batch size for every input (forward's *images)
    try:
        with warnings.catch_warnings():  # "axis name batch will not be used": several inputs share it, as meant
            warnings.filterwarnings("ignore", ".*The axis name: batch will not be used")
            torch.onnx.export(net, examples, str(tmp), input_names=names, output_names=["probabilities"],
                              dynamic_shapes={"images": tuple({0: batch} for _ in parts)}, opset_version=OPSET,
                              dynamo=True, verbose=False, external_data=False)
        graph = onnx.load(str(tmp))
        described = [{"input": n, "backbone": b.backbone, "tta": b.tta,
                      "preprocessing": json.loads(b.preprocessing.to_json())} for n, b in zip(names, parts)]
        onnx.helper.set_model_props(graph, {"featpipe_classes": json.dumps(bundle.classes),
                                            "featpipe_preprocessing": bundle.preprocessing.to_json(),
                                            "featpipe_backbone": bundle.backbone,
                                            "featpipe_parts": json.dumps(described)})
        onnx.checker.check_model(graph)
        onnx.save(graph, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    inputs = [{"name": n, "dtype": "uint8", "shape": ["batch", b.preprocessing.crop, b.preprocessing.crop, 3]}
              for n, b in zip(names, parts)]
    return {"model": str(bundle.path), "format": "onnx", "file": str(out), "classes": bundle.classes,
            "input": inputs[0], "inputs": inputs, "output": {"name": "probabilities",
                                                             "shape": ["batch", len(bundle.classes)]},
            "opset": OPSET, "bytes": out.stat().st_size}


class Probabilities(torch.nn.Module):
    """uint8 NHWC per backbone -> softmax(head(embeddings)): what `featpipe predict` computes, as one module
    (several backbones: each one's rows at unit length, side by side, as feature_sets.side_by_side)."""

    def __init__(self, backbones: list[torch.nn.Module], flips: list[bool], head: torch.nn.Module) -> None:
        super().__init__()
        self.backbones, self.flips, self.head = torch.nn.ModuleList(backbones), flips, head

    def forward(self, *images: torch.Tensor) -> torch.Tensor:
        z = [(b(x) + b(x.flip(2))) / 2 if flip else b(x) for b, flip, x in zip(self.backbones, self.flips, images)]
        if len(z) > 1:
            z = [e / e.norm(dim=1, keepdim=True).clamp_min(1e-12) for e in z]
        return torch.softmax(self.head(torch.cat(z, dim=1)), dim=1)
