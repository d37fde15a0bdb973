"""Build a registry entry into a frozen embedding network: uint8 NHWC in, pooled pre-logits features out.

`Backbone.forward` normalises on whatever device it runs on, so decoders ship uint8 (4x less to move) and every
path (Pillow, DALI CPU, DALI GPU) feeds the same function.
"""

from __future__ import annotations

import contextlib
import copy
import io
import socket
import sys
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from featpipe import weights as W
from featpipe.errors import UserError, first_line
from featpipe.registry import BackboneSpec

NET_TIMEOUT_S = 10  # per connect or read (HF's own download timeout): a live download never stalls that long
HUB_CHECK_TIMEOUT_S = 5  # the one metadata request to the HF hub before timm's download (_require_hub)


class Backbone(nn.Module):
    def __init__(self, body: nn.Module, imagenet_head: nn.Module | None, spec: BackboneSpec):
        super().__init__()
        self.body, self.imagenet_head, self.spec = body, imagenet_head, spec
        pre = spec.preprocessing
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> float NCHW in channels_last memory (the permute is free)."""
        x = x.permute(0, 3, 1, 2).float()
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def forward(self, x_uint8_nhwc: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x_uint8_nhwc)).flatten(1)

    def blocks(self) -> list[nn.Module]:
        return backbone_blocks(self.body)


@dataclass
class Loaded:
    model: Backbone
    weights_sha256: str


def load(spec: BackboneSpec, weights_path: Path | None = None, pretrained: bool = True) -> Loaded:
    """Pretrained (packaged file, hub cache/network, or --weights PATH) or random init (`pretrained=False`)."""
    if not pretrained:
        return Loaded(_split(_build(spec), spec), "random-init")
    if weights_path is not None:
        return _from_file(spec, Path(weights_path))
    if spec.library == "torchvision":
        return _torchvision_pretrained(spec)
    packaged = spec.offline_path()
    if packaged is not None:
        return _from_file(spec, packaged)
    return _timm_pretrained(spec)


def weights_sha256(spec: BackboneSpec, weights_path: Path | None = None) -> str:
    """The hash that keys the cache: of the weights file when there is one, else of the loaded model's state."""
    return W.known_sha256(spec, weights_path) or load(spec).weights_sha256


def _build(spec: BackboneSpec) -> nn.Module:
    if spec.library == "torchvision":
        import torchvision

        return torchvision.models.get_model(spec.arch, weights=None)
    import timm

    return timm.create_model(spec.arch, pretrained=False)


def _from_file(spec: BackboneSpec, path: Path) -> Loaded:
    W.require_file(path)
    if W.is_safetensors(path):
        return _from_bundle_state(spec, path)
    model = _build(spec)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise W.load_error(path, e) from None
    state = W.state_dict_of(loaded, path)
    if spec.remap:
        state = W.remap_positional(state, model.state_dict())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"weights {path} do not fit {spec.arch}: {state_mismatch(e)}") from None
    return Loaded(_split(model, spec), W.sha256_file(path))


def _from_bundle_state(spec: BackboneSpec, path: Path) -> Loaded:
    """A fine-tuned (or scratch) bundle's backbone.safetensors: the registry's architecture, every weight from the
    file (Backbone.state_dict() keys; the ImageNet classifier's are not needed for features)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    backbone = _split(_build(spec), spec)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read weights {path}: a damaged safetensors file ({first_line(e)})") from None
    body = {k.removeprefix("body."): v for k, v in state.items() if k.startswith("body.")}
    try:
        backbone.body.load_state_dict(body, strict=True)
    except RuntimeError as e:
        raise UserError(f"weights {path} do not fit {spec.arch}: {state_mismatch(e)}") from None
    return Loaded(backbone, W.sha256_file(path))


def state_mismatch(e: RuntimeError) -> str:
    """load_state_dict's complaint in one line: its first line says nothing, the next ones name keys and shapes."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = " ".join(lines[1:]) or first_line(e)
    return detail if len(detail) <= 300 else detail[:300] + " …"


def offline_error(spec: BackboneSpec, why: str, hint: str | None = None) -> UserError:
    """The one message for weights that cannot be had offline; `hint` replaces the default advice."""
    hint = hint or spec.install_hint or "connect to the network once (weights are then cached) or pass --weights PATH"
    return UserError(f"pretrained weights for {spec.name!r} are not available offline ({why}); {hint}")


def _torchvision_pretrained(spec: BackboneSpec) -> Loaded:
    import torchvision

    if spec.offline_module:
        W.install_into_hub_cache(spec.url, spec.offline_module)
    weights = torchvision.models.get_model_weights(spec.arch).DEFAULT if spec.url is None else next(
        w for w in torchvision.models.get_model_weights(spec.arch) if w.url == spec.url)
    try:
        with socket_timeout(NET_TIMEOUT_S), stdout_to_stderr():
            model = torchvision.models.get_model(spec.arch, weights=weights)
    except (urllib.error.URLError, OSError) as e:
        raise offline_error(spec, f"download failed: {getattr(e, 'reason', e)}") from None
    path = W.hub_checkpoint(weights.url)
    return Loaded(_split(model, spec), W.check_hash_prefix(path, weights.url))


def _timm_pretrained(spec: BackboneSpec) -> Loaded:
    import timm

    with _hf_hub_access(spec):
        try:
            with socket_timeout(NET_TIMEOUT_S), stdout_to_stderr():
                model = timm.create_model(spec.arch, pretrained=True)
        except Exception as e:  # huggingface_hub raises its own offline/HTTP errors
            raise offline_error(spec, f"download failed: {first_line(e) or type(e).__name__}") from None
    return Loaded(_split(model, spec), _state_sha256(model))


@contextlib.contextmanager
def _hf_hub_access(spec: BackboneSpec) -> Iterator[None]:
    """Weights in the local HF hub cache load with the hub offline (no request at all); otherwise the hub must
    answer one quick request first. Left alone, huggingface_hub retries an unreachable hub with backoff (~50 s,
    a warning per try), and it has no setting to turn that off."""
    if spec.hf_hub is None:  # weights timm fetches by URL go through torch.hub: socket_timeout covers them
        yield
        return
    from huggingface_hub import constants

    if spec.hf_cached() is None:
        _require_hub(spec)
        yield
        return
    offline, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True  # read on each request, restored below
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = offline


def _require_hub(spec: BackboneSpec) -> None:
    """huggingface_hub's own metadata request for the first file timm will ask for, once, without retries: proxies,
    HF_ENDPOINT, tokens and HF_HUB_OFFLINE apply as in the download. Any HTTP answer (even 404) means online."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    hub = spec.hf_hub
    try:
        get_hf_file_metadata(hf_hub_url(hub.repo, hub.files[0], revision=hub.revision), timeout=HUB_CHECK_TIMEOUT_S)
    except HfHubHTTPError:
        return
    except Exception as e:  # httpx's connect/timeout errors, OfflineModeIsEnabled
        raise offline_error(spec, f"download failed: {first_line(e) or type(e).__name__}") from None


@contextlib.contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """torch.hub opens its URL with no timeout: a network that drops packets (a silent firewall or proxy) would
    hang the download forever instead of failing."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """torch.hub announces a download on stdout, which belongs to --json's one object: the notice goes to stderr,
    and only if the download worked (a failure is the one-line error alone)."""
    notice = io.StringIO()
    with contextlib.redirect_stdout(notice):
        yield
    sys.stderr.write(notice.getvalue())


def _state_sha256(model: nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _split(model: nn.Module, spec: BackboneSpec) -> Backbone:
    """Detach the ImageNet classifier: timm via reset_classifier, torchvision by replacing its last Linear."""
    model.eval()
    if spec.library == "timm":
        head = copy.deepcopy(model.get_classifier())
        model.reset_classifier(0)
        return Backbone(model, head, spec).eval()
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    head = getattr(parent, leaf)
    setattr(parent, leaf, nn.Identity())
    return Backbone(model, head, spec).eval()


def backbone_blocks(body: nn.Module) -> list[nn.Module]:
    """The ordered blocks "the last N" counts from, for the common layouts; top-level children otherwise."""
    if hasattr(body, "blocks") and hasattr(body, "conv_head"):  # timm EfficientNet / MobileNet family
        stages = [b for stage in body.blocks for b in stage]
        return stages + [nn.ModuleList([body.conv_head, body.bn2])]
    if hasattr(body, "features") and isinstance(body.features, nn.Sequential):  # torchvision MobileNet/EfficientNet
        return list(body.features)
    if all(hasattr(body, f"layer{i}") for i in range(1, 5)):  # ResNet family
        return [b for i in range(1, 5) for b in getattr(body, f"layer{i}")]
    return [m for m in body.children() if any(p.requires_grad for p in m.parameters())]
