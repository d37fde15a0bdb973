"""featpipe export --format onnx: onnxruntime on the exported graph gives featpipe predict's probabilities (fp32)
on real photos, for a head bundle and for a bundle that carries its own backbone."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from featpipe import bundle as B
from featpipe.decode import PilDecoder, decode_files
from featpipe.extract import ExtractConfig
from featpipe.fit_head import FitConfig, fit_and_save
from featpipe.heads import HeadConfig
from featpipe.onnx_export import export_onnx
from featpipe.predict import collect, probabilities
from featpipe.train import TrainConfig, scratch
from tests.conftest import one_line, run_cli, run_json


def onnx_probabilities(path, model_dir, data) -> tuple[np.ndarray, np.ndarray]:
    """(onnxruntime's probabilities, predict's in fp32) for every image under `data`."""
    bundle = B.load(model_dir)
    want, ok, _ = probabilities(bundle, collect([data]), "cpu", precision="fp32")
    pixels = np.stack([r for _, r in decode_files(ok, PilDecoder(bundle.preprocessing))])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(None, {"images": pixels[s:s + 32]})[0] for s in range(0, len(pixels), 32)])
    return got, want


def test_head_bundle_matches_predict_on_the_shipped_photos(tmp_path, warm_cache, shipped):
    fit_and_save(FitConfig(extract=ExtractConfig(cache_dir=warm_cache), head=HeadConfig(), out=tmp_path / "m"),
                 progress=False)
    r = export_onnx(tmp_path / "m", tmp_path / "m.onnx")
    got, want = onnx_probabilities(r["file"], tmp_path / "m", shipped)
    assert got.shape == want.shape == (196, 5) and np.abs(got - want).max() <= 1e-3
    props = {p.key: p.value for p in onnx.load(r["file"]).metadata_props}
    assert json.loads(props["featpipe_classes"]) == B.load(tmp_path / "m").classes == r["classes"]


def test_a_bundle_with_its_own_backbone_exports_that_backbone(tmp_path, small_data):
    scratch(TrainConfig(data_dir=small_data, epochs=1, out=tmp_path / "s"), log=lambda s: None)
    r = export_onnx(tmp_path / "s")  # default: beside the bundle
    assert r["file"] == str(tmp_path / "s" / "model.onnx")
    got, want = onnx_probabilities(r["file"], tmp_path / "s", small_data)
    assert np.abs(got - want).max() <= 1e-3


def test_cli_export(tmp_path, warm_cache):
    fit_and_save(FitConfig(extract=ExtractConfig(cache_dir=warm_cache), head=HeadConfig(kind="mlp"),
                           out=tmp_path / "m"), progress=False)
    r = run_json("export", tmp_path / "m", "--out", tmp_path / "x.onnx")
    assert r["file"] == str(tmp_path / "x.onnx") and r["input"]["dtype"] == "uint8" and r["bytes"] > 0
    proc = run_cli("export", tmp_path / "m", "--format", "tflite")
    assert proc.returncode == 2 and "--format" in one_line(proc)


@pytest.mark.parametrize("missing", ["nope"])
def test_not_a_bundle_is_one_line(tmp_path, missing):
    proc = run_cli("export", tmp_path / missing)
    assert proc.returncode == 2 and "not a model bundle" in one_line(proc)
