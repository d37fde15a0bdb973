"""--weights files that are not a state dict saved with torch.save: one line that says what the file is."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from featpipe import registry
from featpipe import weights as W
from featpipe.backbone import load
from featpipe.errors import UserError
from tests.conftest import run_cli

SPEC = registry.resolve("mobilenet_v2")


def _not_checkpoints(d: Path) -> dict[str, Path]:
    """Files people pass by mistake: text, a plain pickle, a zip, safetensors, random bytes."""
    from safetensors.torch import save_file

    files = {name: d / name for name in ("notes.txt", "plain.pkl", "archive.zip", "model.safetensors", "noise.pth")}
    files["notes.txt"].write_text("ignore me\n")
    files["plain.pkl"].write_bytes(pickle.dumps({"features.0.0.weight": [1.0, 2.0]}, protocol=4))
    with zipfile.ZipFile(files["archive.zip"], "w") as z:
        z.writestr("weights/readme.txt", "hi")
    save_file({"w": torch.zeros(2)}, files["model.safetensors"])
    files["noise.pth"].write_bytes(bytes(range(256)) * 4)
    return files


def test_sniffs_both_torch_save_formats(tmp_path):
    sd = {"w": torch.zeros(3)}
    torch.save(sd, tmp_path / "zip.pth")
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert W.is_torch_checkpoint(tmp_path / "zip.pth") and W.is_torch_checkpoint(tmp_path / "legacy.pth")
    assert W.is_torch_checkpoint(SPEC.offline_path())  # the packaged file (legacy format) still passes
    assert not any(W.is_torch_checkpoint(p) for p in _not_checkpoints(tmp_path).values())


def test_non_checkpoint_files_say_so(tmp_path):
    for path in _not_checkpoints(tmp_path).values():
        if path.suffix == ".safetensors":  # read as a bundle's backbone: its keys are not mobilenet_v2's
            with pytest.raises(UserError, match=f"{path.name} do not fit .*Missing key"):
                load(SPEC, path)
            continue
        with pytest.raises(UserError, match=f"{path.name}: it is neither a PyTorch checkpoint"):
            load(SPEC, path)


def test_checkpoints_that_hold_no_state_dict_say_what_they_hold(tmp_path):
    """A pickled whole model (torch's page-long, ANSI-coloured refusal), a training checkpoint, a cut-off file."""
    import torchvision

    sd = torchvision.models.mobilenet_v2().state_dict()
    torch.save(torchvision.models.mobilenet_v2(), tmp_path / "whole.pth")
    torch.save({"model": sd, "epoch": 3}, tmp_path / "training.pth")
    (tmp_path / "cut.pth").write_bytes(SPEC.offline_path().read_bytes()[:4096])
    for name, says in (("whole.pth", r"pickled Python objects, not a state dict .* save model.state_dict\(\)"),
                       ("training.pth", r"not a state dict \(name -> tensor\): entry 'model' is not a tensor"),
                       ("cut.pth", "a damaged or unsupported PyTorch checkpoint")):
        with pytest.raises(UserError, match=says) as e:
            load(SPEC, tmp_path / name)
        assert "\x1b" not in str(e.value) and "\n" not in str(e.value)


def test_extract_with_a_text_file_as_weights_is_one_line(small_data, tmp_path):
    """The reported case: a text file gave "cannot read weights …: KeyError: 105"."""
    text = tmp_path / "weights.pth"
    text.write_text("hello\n")
    proc = run_cli("extract", small_data, "--cache-dir", tmp_path / "c", "--weights", text, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"featpipe: error: cannot read weights {text}: it is neither a PyTorch checkpoint (a state "
                     f"dict saved with torch.save, usually .pt/.pth) nor a fine-tuned bundle's backbone.safetensors"]
