"""One contract suite over every registry entry whose weights are available (timm-style)."""

from __future__ import annotations

import pytest
import torch

from featpipe import backbone as B
from featpipe import registry
from featpipe.decode import PilDecoder, probe
from featpipe.errors import UserError
from tests.conftest import run_cli

AVAILABLE = [name for name, spec in registry.REGISTRY.items() if spec.weights_available()]
# ImageNet-1k indices of what the photo shows, with a few neighbours a good model may pick instead.
EXPECTED = {"animals/animals_bison.jpg": {347, 346, 345},  # bison, water buffalo, ox
            "tools/tools_hammer3.jpg": {587, 596}}  # hammer, hatchet


def test_offline_entries_are_all_available_here():
    assert set(AVAILABLE) == {"mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}


@pytest.mark.parametrize("name", AVAILABLE)
def test_backbone_contract(name, shipped):
    spec = registry.resolve(name)
    loaded = B.load(spec)  # strict load inside; positional remap asserts every shape
    assert loaded.weights_sha256 == B.weights_sha256(spec)
    pre = spec.preprocessing
    data = [(shipped / rel).read_bytes() for rel in EXPECTED]
    pixels, reasons = PilDecoder(pre).decode(data, [probe(d) for d in data])
    assert reasons == [None] * len(data) and pixels.shape == (len(data), pre.crop, pre.crop, 3)
    with torch.inference_mode():
        emb = loaded.model(torch.from_numpy(pixels))
        top5 = loaded.model.imagenet_head(emb).topk(5).indices.tolist()
    assert emb.shape == (len(data), spec.dim)
    for (rel, want), top in zip(EXPECTED.items(), top5):
        assert want & set(top), f"{name}: {rel} top-5 {top} misses {want}"
    blocks = loaded.model.blocks()
    assert len(blocks) >= 5 and all(any(True for _ in b.parameters()) for b in blocks)


def test_mobilenet_weights_hash_matches_torchvision_name():
    spec = registry.resolve("mobilenet_v2")
    assert B.weights_sha256(spec).startswith("b0353104")


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(UserError, match="did you mean.*mobilenet_v2"):
        registry.resolve("mobilenet_v3x")


def test_other_torchvision_names_resolve_with_their_own_preprocessing():
    spec = registry.resolve("resnet50")
    assert (spec.library, spec.dim, spec.preprocessing.crop, spec.preprocessing.resize) == ("torchvision", 2048,
                                                                                            224, 232)


def test_local_checkpoint_with_weights_flag(tmp_path, small_data):
    """Users with a local checkpoint: any torchvision name + --weights PATH (here a saved random-init resnet18)."""
    import torchvision

    ckpt = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), ckpt)
    proc = run_cli("extract", small_data, "-b", "resnet18", "--weights", ckpt, "--cache-dir", tmp_path / "c",
                   "--json", check=True)
    assert '"dim": 512' in proc.stdout and '"computed": 20' in proc.stdout
    # the same checkpoint carries through fit-head (features from the cache) and predict (which must be given it)
    run_cli("fit-head", small_data, "-b", "resnet18", "--weights", ckpt, "--cache-dir", tmp_path / "c",
            "--val-fraction", "0", "--out", tmp_path / "m", check=True)
    image = next(small_data.glob("tools/*.jpg"))
    assert '"class"' in run_cli("predict", tmp_path / "m", image, "--weights", ckpt, "--json", check=True).stdout
    proc = run_cli("predict", tmp_path / "m", image)
    assert proc.returncode == 2 and "--weights PATH" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_offline_without_weights_fails_with_one_line(tmp_path, small_data):
    """torch.hub's "Downloading: ..." notice goes to stdout: under --json it must not reach it."""
    proc = run_cli("extract", small_data, "-b", "resnet50", "--cache-dir", tmp_path / "c", "--json",
                   env={"TORCH_HOME": str(tmp_path / "empty-hub")}, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", (proc.stdout, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1 and "--weights PATH" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_timm_names_know_where_timm_gets_their_weights():
    """The HF hub repo and files timm asks for, in its order: what weights_available looks up in the hub cache."""
    assert registry.resolve("test_vit").hf_hub == registry.HubFiles(
        "timm/test_vit.r160_in1k", None, ("model.safetensors", "pytorch_model.bin"))
    clip = registry.HubFiles.of({"hf_hub_id": "org/m@v2", "hf_hub_filename": "open_clip_pytorch_model.bin"})
    assert clip == registry.HubFiles("org/m", "v2", ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
    assert registry.HubFiles.of({"hf_hub_id": "org/m", "hf_hub_filename": "w.safetensors"}).files == ("w.safetensors",)
    assert registry.HubFiles.of({"url": "https://example.org/w.pth"}) is None
