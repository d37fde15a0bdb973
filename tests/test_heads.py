"""Heads on cached features: splits, the logistic/MLP heads, fit-head's CLI contract and accuracy on real photos."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from featpipe.errors import UserError
from featpipe.extract import ExtractConfig
from featpipe.features import Features, from_result, load_features
from featpipe.heads import Head, HeadConfig, accuracy, fit_head, unit_norm
from featpipe.splits import check_folds, kfold, val_split
from bench.heads import overlapping
from tests.conftest import run_cli, run_json

KEYS = {"head", "backbone", "train_accuracy", "val_accuracy", "cv_accuracy_mean", "cv_accuracy_std", "fit_seconds",
        "n_train", "n_val", "classes", "model_path", "duplicate_files", "label_conflicts", "class_counts", "data_dir",
        "c_search", "validation", "groups"}


@pytest.fixture(scope="module")
def feats(warm_cache) -> Features:
    return load_features(ExtractConfig(cache_dir=warm_cache), progress=False)


def test_features_follow_paths_not_cache_order(feats, warm_cache):
    """Rows sorted by path whatever order extract listed members in: splits are the same for every backbone."""
    members = feats.result.members
    shuffled = dataclasses.replace(feats.result, members=members.take(reversed(range(len(members)))))
    again = from_result(shuffled)
    assert again.paths == feats.paths == sorted(feats.paths)
    np.testing.assert_array_equal(again.X, feats.X)
    assert feats.X.dtype == np.float32 and feats.X.shape == (196, 1280)
    assert feats.classes == ["animals", "fishes", "monuments", "renewable_energy", "tools"]


def test_val_split_is_stratified_and_deterministic(feats):
    a = val_split(feats.y, feats.classes, 0.2, seed=0)
    b = val_split(feats.y, feats.classes, 0.2, seed=0)
    np.testing.assert_array_equal(a.val, b.val)
    assert not set(a.train) & set(a.val) and len(a.train) + len(a.val) == len(feats.y)
    for c, n in enumerate(np.bincount(feats.y)):
        assert np.sum(feats.y[a.val] == c) == round(0.2 * n)
    assert not np.array_equal(val_split(feats.y, feats.classes, 0.2, seed=1).val, a.val)


def test_split_and_folds_refuse_tiny_classes():
    y = np.array([0, 0, 0, 1])
    with pytest.raises(UserError, match="'b' has 1 image"):
        val_split(y, ["a", "b"], 0.2, 0)
    with pytest.raises(UserError, match="class 'b' has 1; add images to it, or leave it out$"):  # not "--cv 1"
        check_folds(y, ["a", "b"], 2)
    with pytest.raises(UserError, match="class 'b' has 2; use --folds 2 or less$"):
        check_folds(np.array([0, 0, 0, 1, 1]), ["a", "b"], 3, "--folds")
    assert len(kfold(np.array([0, 0, 1, 1]), 2, 0)) == 2
    with pytest.raises(UserError, match="training needs at least 2 per class$"):  # no hint training rejects
        val_split(y, ["a", "b"], 0.2, 0, zero_ok=False)


def test_split_needs_two_classes():
    """One class: sklearn's solver would raise mid-fit and an MLP would learn a constant; refuse before both."""
    with pytest.raises(UserError, match="at least 2 classes with images, found 1: b$"):
        val_split(np.array([1, 1, 1]), ["a", "b"], 0.0, 0)


def test_logistic_module_folds_scaler_and_matches_sklearn(feats):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    X, y = feats.X[::2], feats.y[::2]
    head = fit_head(X, y, len(feats.classes), HeadConfig("logistic"))
    ref = make_pipeline(Normalizer(), StandardScaler(), LogisticRegression(C=head.params["C"], max_iter=1000))
    ref.fit(X, y)
    np.testing.assert_allclose(head.predict_proba(feats.X), ref.predict_proba(feats.X), atol=1e-3)
    module = head.as_torch_module()
    assert [type(m).__name__ for m in module] == ["UnitNorm", "Linear"]
    a = head.arrays
    manual = ((unit_norm(feats.X) - a["mean"]) / a["scale"]) @ a["w1"].T + a["b1"]
    np.testing.assert_allclose(module(torch.from_numpy(feats.X)).detach().numpy(), manual, rtol=1e-3, atol=1e-3)


def test_binary_head_matches_sigmoid(feats):
    from sklearn.linear_model import LogisticRegression

    keep = feats.y < 2
    X, y = feats.X[keep], feats.y[keep]
    head = fit_head(X, y, 2, HeadConfig("logistic", Cs=(0.1,)))
    Z = (unit_norm(X) - head.arrays["mean"]) / head.arrays["scale"]
    ref = LogisticRegression(C=0.1, max_iter=1000).fit(Z, y)
    np.testing.assert_allclose(head.predict_proba(X), ref.predict_proba(Z), atol=1e-3)


def test_mlp_head_module_and_arrays(feats):
    split = val_split(feats.y, feats.classes, 0.2, 0)
    head = fit_head(feats.X[split.train], feats.y[split.train], 5, HeadConfig("mlp", max_epochs=100))
    assert accuracy(head, feats.X[split.val], feats.y[split.val]) >= 0.8
    assert {k: v.shape for k, v in head.arrays.items()} == {
        "mean": (1280,), "scale": (1280,), "w1": (256, 1280), "b1": (256,), "w2": (5, 256), "b2": (5,)}
    logits = head.as_torch_module().eval()(torch.from_numpy(feats.X[:4]))
    np.testing.assert_allclose(torch.softmax(logits, 1).detach().numpy(), head.predict_proba(feats.X[:4]), atol=1e-5)


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_head_from_a_trained_module_gives_the_same_outputs(feats, kind):
    """Fine-tuning trains as_torch_module()'s layers; the bundle stores them back as a Head (standardiser folded in)."""
    head = fit_head(feats.X, feats.y, 5, HeadConfig(kind, Cs=(0.1,), max_epochs=20))
    module = head.as_torch_module()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.01 * torch.randn_like(p))  # as training would: no longer the fitted head's numbers
    back = Head.from_torch_module(module, {"finetuned": True})
    assert back.kind == kind and back.params.get("dropout") == head.params.get("dropout")
    x = torch.from_numpy(feats.X[:8])
    torch.testing.assert_close(back.as_torch_module().eval()(x), module.eval()(x), atol=1e-5, rtol=1e-5)


def test_accuracy_ties_do_not_pick_a_uniform_head(feats):
    """4 images per class: several C tie on inner-CV accuracy. The most regularised of them (1e-4, the old rule's
    pick) answers right with near-uniform probabilities; held-out log-loss breaks the tie towards a confident head."""
    rows = np.concatenate([np.flatnonzero(feats.y == c)[:4] for c in range(5)])
    head = fit_head(feats.X[rows], feats.y[rows], 5, HeadConfig())
    top = head.predict_proba(feats.X[rows]).max(1)
    assert head.params["C"] > 1e-4 and np.median(top) > 0.5, (head.params, np.median(top))


def test_logistic_sweep_is_fast_on_600_rows(feats, capsys):
    """~600 x 1280 (the real features tiled with noise): the 11-C x 5-fold sweep plus final fit in seconds."""
    rng = np.random.default_rng(0)
    X = np.concatenate([feats.X + 0.1 * feats.X.std(0) * rng.standard_normal(feats.X.shape, np.float32)
                        for _ in range(3)])
    y = np.tile(feats.y, 3)
    timings = {}
    for name, (Xn, yn) in {"196": (feats.X, feats.y), "588": (X, y)}.items():
        t0 = time.perf_counter()
        fit_head(Xn, yn, 5, HeadConfig())
        timings[name] = round(time.perf_counter() - t0, 2)
    with capsys.disabled():
        print(f"\nlogistic sweep seconds (rows x 1280): {timings}")
    assert timings["588"] < 30  # a few seconds on 2 idle cores; generous for a loaded CI box


def test_fit_head_logistic_cli(warm_cache, tmp_path, capsys):
    out = tmp_path / "bundle"
    r = run_json("fit-head", "--cache-dir", warm_cache, "--cv", "5", "--out", out)
    with capsys.disabled():
        print(f"\nfit-head logistic: {r}")
    assert set(r) == KEYS and r["head"] == "logistic" and r["backbone"] == "mobilenet_v2"
    assert r["cv_accuracy_mean"] >= 0.90 and r["val_accuracy"] >= 0.85
    assert (r["n_train"], r["n_val"]) == (156, 40) and Path(r["model_path"]) == out
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "head.safetensors"]
    for f in out.iterdir():  # no pickle: protocol-2+ pickles start with 0x80, zip-pickles (torch.save) with PK
        assert not f.read_bytes().startswith((b"\x80", b"PK"))
    assert set(load_file(str(out / "head.safetensors"))) == {"mean", "scale", "w1", "b1"}


def test_fit_head_float16_features(warm_cache, tmp_path):
    """--features-dtype float16 holds X at half the memory and fits the same head (up to rounding); a bad value is
    one line before any work."""
    half = run_json("fit-head", "--cache-dir", warm_cache, "--features-dtype", "float16", "--out", tmp_path / "h")
    full = run_json("fit-head", "--cache-dir", warm_cache, "--out", tmp_path / "f")
    assert half["c_search"]["chosen"] == full["c_search"]["chosen"]
    assert abs(half["val_accuracy"] - full["val_accuracy"]) <= 0.03
    proc = run_cli("fit-head", "--cache-dir", warm_cache, "--features-dtype", "int8", "--out", tmp_path / "x")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "featpipe: error: --features-dtype must be float32 or float16 (got 'int8')"]


def test_fit_head_mlp_cli(warm_cache, tmp_path):
    r = run_json("fit-head", "--cache-dir", warm_cache, "--head", "mlp", "--out", tmp_path / "m")
    assert set(r) == KEYS and r["head"] == "mlp" and r["cv_accuracy_mean"] is None and r["cv_accuracy_std"] is None
    assert r["val_accuracy"] > 0.8


def test_fit_head_cv_larger_than_smallest_class_is_one_line(warm_cache, tmp_path):
    proc = run_cli("fit-head", "--cache-dir", warm_cache, "--cv", "30", "--out", tmp_path / "x")
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("featpipe: error: --cv 30") and "'animals' has 24" in line
    assert not (tmp_path / "x").exists()


def test_bad_head_and_fraction_are_user_errors(feats):
    with pytest.raises(UserError, match="--head must be one of"):
        HeadConfig("svm")
    with pytest.raises(UserError, match="--val-fraction"):
        val_split(feats.y, feats.classes, 1.5, 0)


def test_fit_head_bad_flags_fail_before_extracting(small_data, tmp_path):
    for flags, msg in ((["--val-fraction", "1"], "--val-fraction must be in [0, 1) (got 1.0)"),
                       (["--cv", "1"], "--cv must be at least 2 (got 1)"),
                       (["--seed", "-1"], "--seed must be in [0, 2**32) (got -1)")):
        proc = run_cli("fit-head", small_data, "--cache-dir", tmp_path / "c", *flags)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"featpipe: error: {msg}"]
        assert not (tmp_path / "c").exists()


def test_fit_head_one_class_is_one_line(small_data, tmp_path):
    for cls in ["animals", "fishes", "monuments", "renewable_energy"]:
        shutil.rmtree(small_data / cls)
    for head in ("logistic", "mlp"):
        proc = run_cli("fit-head", small_data, "--cache-dir", tmp_path / "c", "--head", head, "--out", tmp_path / "m")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].endswith("at least 2 classes with images, found 1: tools")
    assert not (tmp_path / "m").exists()


def test_fit_head_class_without_valid_image(shipped, tmp_path):
    """Two real photos in one class, only a text file in the other: exit 2 naming the empty class."""
    data = tmp_path / "data"
    (data / "fishes").mkdir(parents=True)
    (data / "tools").mkdir()
    for f in sorted((shipped / "tools").iterdir())[:2]:
        shutil.copy(f, data / "tools" / f.name)
    (data / "fishes" / "notes.jpg").write_text("not an image")
    proc = run_cli("fit-head", data, "--cache-dir", tmp_path / "c", "--out", tmp_path / "m")
    assert proc.returncode == 2 and "fishes" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("classes", [2, 5])
@pytest.mark.parametrize("backend", ["numpy", "torch", "float64"])
def test_logreg_reaches_sklearns_optimum(feats, classes, backend):
    """featpipe.logreg stands in for sklearn's LogisticRegression(lbfgs): an objective value at least as low as
    sklearn's (to a small relative tolerance) and the same probabilities, on real features; with numpy rows, with
    torch rows (the GPU path's code, here on the CPU), and in float64."""
    from sklearn.linear_model import LogisticRegression

    from featpipe import logreg

    keep = feats.y < classes
    X = unit_norm(feats.X[keep])
    Z, y = ((X - X.mean(0)) / X.std(0)).astype(np.float32), feats.y[keep]
    rows = logreg.Rows.of(torch.from_numpy(Z) if backend == "torch" else Z,
                          "float64" if backend == "float64" else "float32")
    for C in (0.01, 1.0):
        ours, ref = logreg.fit(rows, y, C, max_iter=1000), LogisticRegression(C=C, max_iter=1000).fit(Z, y)
        np.testing.assert_allclose(ours.predict_proba(Z), ref.predict_proba(Z), atol=1e-4)
        assert ours.evaluate(rows, y)[0] == (ref.predict(Z) == y).mean()

        def objective(coef, icpt):
            p = logreg.LogReg(ours.classes, coef, icpt, True).predict_proba(Z)[np.arange(len(y)), y]
            return C * -np.log(p).sum() + 0.5 * float(np.sum(coef.astype(np.float64) ** 2))

        assert objective(ours.coef, ours.intercept) <= objective(ref.coef_, ref.intercept_) * (1 + 1e-5)


def test_stratified_folds_are_sklearns():
    """The fold assignment is sklearn's StratifiedKFold(shuffle=True), so CV numbers did not move when the
    heads stopped importing sklearn."""
    from sklearn.model_selection import StratifiedKFold

    from featpipe.splits import stratified_folds

    rng = np.random.default_rng(1)
    for _ in range(50):
        k = int(rng.integers(2, 6))
        y = np.repeat(rng.permutation(int(rng.integers(2, 8))) * 3 + 7, k)
        y = rng.permutation(np.concatenate([y, rng.choice(y, int(rng.integers(0, 200)))]))
        seed = int(rng.integers(0, 1000))
        ref = np.empty(len(y), np.int64)
        for i, (_, te) in enumerate(StratifiedKFold(k, shuffle=True, random_state=seed).split(y, y)):
            ref[te] = i
        np.testing.assert_array_equal(stratified_folds(y, k, seed), ref)


def test_a_head_without_unit_norm_round_trips(feats):
    """A scratch model's plain Linear head: from_torch_module marks it, and predict_proba and as_torch_module
    both leave the features unnormalised, as it was trained."""
    layer = torch.nn.Linear(feats.X.shape[1], 5)
    head = Head.from_torch_module(layer, {"scratch": True})
    assert head.params == {"scratch": True, "unit_norm": False}
    assert [type(m).__name__ for m in head.as_torch_module()] == ["Linear"]
    x = torch.from_numpy(feats.X[:8])
    with torch.no_grad():
        want = torch.softmax(layer(x), 1).numpy()
        np.testing.assert_allclose(torch.softmax(head.as_torch_module()(x), 1).numpy(), want, atol=1e-5)
    np.testing.assert_allclose(head.predict_proba(feats.X[:8]), want, atol=1e-5)


def test_c_search_switches_to_a_holdout_above_holdout_rows():
    """Up to holdout_rows training rows: every C on inner folds; above: a hold-out and a handful of fits, with an
    accuracy as good on fresh rows."""
    X, y = overlapping(6000)
    train, test = np.arange(4000), np.arange(4000, 6000)
    small = fit_head(X, y, 5, HeadConfig(), rows=train)
    large = fit_head(X, y, 5, HeadConfig(holdout_rows=3999), rows=train)
    s, h = small.report["c_search"], large.report["c_search"]
    assert s["method"] == "inner-cv" and s["folds"] == 5 and 3 <= len(s["values"]) <= 7
    assert h["method"] == "holdout" and h["holdout_rows"] == 400 and 3 <= len(h["values"]) <= 7
    assert set(h["values"]) <= set(HeadConfig().Cs) and h["chosen"] == large.params["C"]
    assert abs(accuracy(large, X, y, test) - accuracy(small, X, y, test)) <= 0.01
    assert 0.6 <= accuracy(small, X, y, test) < 0.97  # a probe that is neither trivial nor hopeless


def test_large_fits_are_deterministic_and_read_rows_in_place(feats):
    """The multi-threaded hold-out path gives the same head twice; fitting on `rows` of X (read in place, some
    slices masked, some gathered) gives the head that fitting on the copied rows gives."""
    rng = np.random.default_rng(0)
    rows = np.sort(rng.permutation(len(feats.y))[:170])
    cfg = HeadConfig(holdout_rows=100)
    a, b = (fit_head(feats.X, feats.y, 5, cfg, rows=rows) for _ in range(2))
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    np.testing.assert_array_equal(fit_head(feats.X, feats.y, 5, cfg, rows=rows[::-1]).arrays["w1"], a.arrays["w1"])
    copied = fit_head(np.ascontiguousarray(feats.X[rows]), feats.y[rows], 5, cfg)
    assert copied.params["C"] == a.params["C"]  # the same problem; summed in another order, L-BFGS stops nearby
    p, q = copied.predict_proba(feats.X), a.predict_proba(feats.X)
    np.testing.assert_allclose(p, q, atol=0.05)  # weakly regularised: a flat optimum (0.02 apart at most, seen)
    assert (p.argmax(1) == q.argmax(1)).all()


def test_rows_are_read_in_their_order(feats):
    """Rows whose indices span a range without being one (ends in place, middle reversed) are gathered in their
    order, not read as the range's slice."""
    from featpipe import logreg

    Z = feats.X / np.linalg.norm(feats.X, axis=1, keepdims=True)
    every = np.arange(len(feats.y))
    inside_out = np.concatenate([[0], every[-2:0:-1], [every[-1]]])
    a = logreg.fit(logreg.Rows.of(Z).subset(inside_out), feats.y[inside_out], 0.1, max_iter=1000)
    b = logreg.fit(logreg.Rows.of(Z), feats.y, 0.1, max_iter=1000)
    np.testing.assert_allclose(a.predict_proba(Z), b.predict_proba(Z), atol=1e-3)


def test_float16_features_fit_like_float32(feats):
    """X may be held in float16 (half the memory): chunks are cast for the products."""
    cfg = HeadConfig(Cs=(0.1,))
    full, half = (fit_head(feats.X.astype(t), feats.y, 5, cfg) for t in (np.float32, np.float16))
    np.testing.assert_allclose(half.predict_proba(feats.X), full.predict_proba(feats.X), atol=1e-2)


def test_mlp_minibatches_match_full_batch_accuracy():
    """On more rows than one batch, the minibatch MLP scores as the full-batch one did, in far fewer epochs."""
    X, y = overlapping(4000, seed=1)
    train, test = np.arange(3000), np.arange(3000, 4000)
    mini = fit_head(X, y, 5, HeadConfig("mlp"), rows=train)
    full = fit_head(X, y, 5, HeadConfig("mlp", batch_size=10**9), rows=train)
    assert abs(accuracy(mini, X, y, test) - accuracy(full, X, y, test)) <= 0.02
    assert mini.params["epochs"] < full.params["epochs"]


def test_a_large_fit_runs_where_device_says(feats):
    """device="cuda": a large fit's products run on the GPU and give the CPU's head; without a GPU, one line."""
    cfg = HeadConfig(holdout_rows=100, device="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            fit_head(feats.X, feats.y, 5, cfg)
        return
    gpu = fit_head(feats.X, feats.y, 5, cfg)
    cpu = fit_head(feats.X, feats.y, 5, dataclasses.replace(cfg, device="cpu"))
    assert gpu.params["C"] == cpu.params["C"]
    np.testing.assert_allclose(gpu.predict_proba(feats.X), cpu.predict_proba(feats.X), atol=0.05)


def test_the_c_path_stops_past_the_optimum_and_refines_towards_the_better_side():
    """Decades strong to weak, stopped at the first one both less accurate than the best and a worse fit than the
    one before; then one half-decade beside the best. Accuracy falling while the fit still improves goes on."""
    from featpipe.c_search import search_path

    def curve(acc, loss):
        calls = []

        def score(i, start):
            calls.append((i, start))
            return acc[i], loss[i]
        return score, calls

    acc = [0.5, 0.6, 0.7, 0.8, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4]
    loss = [2.0, 1.5, 1.0, 0.8, 0.5, 0.6, 0.7, 0.9, 1.2, 1.5, 2.0]
    score, calls = curve(acc, loss)
    assert sorted(search_path(score, 11)) == [0, 2, 4, 5, 6] and calls[-1] == (5, 4)  # 6 stops; 5 beside the best
    assert [c for c in calls[:-1]] == [(0, None), (2, 0), (4, 2), (6, 4)]  # each warm-started from the one before
    falling = [0.9, 0.9, 0.85, 0.85, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]
    score, calls = curve(falling, [2.0 - 0.1 * i for i in range(11)])
    assert sorted(search_path(score, 11)) == [0, 1, 2, 4, 6, 8, 10]  # every decade, then 1 beside the best (0)
