"""`featpipe evaluate`: scores against sklearn's own definitions, a bundle scored on photos it never saw, and
class folders the bundle does not know."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from featpipe.evaluate import confidently_wrong, scores
from tests.conftest import make_subset, one_line, run_cli, run_json


def test_scores_count_what_they_say():
    """6 classes (top-5 reported), one class never predicted, one never present: per-class zeros, not errors."""
    classes = list("abcdef")
    y = np.array([0, 0, 1, 1, 2, 3, 4, 4])
    proba = np.full((8, 6), 0.01)
    pred = [0, 1, 1, 1, 2, 3, 3, 5]  # 5 right of 8; class 4 never predicted, 5 predicted but absent
    proba[np.arange(8), pred] = 0.9
    proba[[6, 7], 4] = 0.05  # the wrong ones' true classes come second: inside the top 5 (no ties at 0.01)
    proba[1, 0] = proba[2, 1] = 0.05
    s = scores(y, proba, classes)
    assert s["accuracy"] == 5 / 8 and s["top5_accuracy"] == 1.0
    assert s["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": round(2 / 3, 6), "support": 2}
    assert s["per_class"]["e"]["recall"] == 0 and s["per_class"]["f"]["support"] == 0
    assert np.array(s["confusion"]).sum() == 8 and s["confusion"][4][3] == 1 and s["confusion"][4][5] == 1
    assert s["macro"]["recall"] == pytest.approx(np.mean([0.5, 1, 1, 1, 0, 0]), abs=1e-6)
    wrong = confidently_wrong(y, proba, [Path(f"{i}.jpg") for i in range(8)], classes, 2)
    assert [w["path"] for w in wrong] == ["1.jpg", "6.jpg"] and wrong[0]["predicted"] == "b"


@pytest.fixture(scope="module")
def held_out(shipped, tmp_path_factory) -> tuple[Path, Path]:
    """(train, test): the first 8 photos of each class to fit on, the last 4 to score."""
    root = tmp_path_factory.mktemp("eval")
    train = make_subset(shipped, root / "train", 8)
    test = root / "test"
    for d in sorted(p for p in shipped.iterdir() if p.is_dir()):
        (test / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir())[-4:]:
            shutil.copy(f, test / d.name / f.name)
    return train, test


def test_evaluate_a_bundle_on_photos_it_never_saw(held_out, tmp_path):
    train, test = held_out
    cache, model, out = tmp_path / "c", tmp_path / "m", tmp_path / "eval"
    run_json("fit-head", train, "--cache-dir", cache, "--out", model, "--val-fraction", "0")
    r = run_json("evaluate", model, test, "--out", out, "--worst", "3", "--cache-dir", cache)
    assert run_json("cache", "info", "--cache-dir", cache)["caches"][0]["rows"] == 40 + 20  # test rows cached too
    again = run_json("evaluate", model, test, "--worst", "3", "--cache-dir", cache)
    assert [again[k] for k in ("accuracy", "confusion", "per_class")] == [r[k] for k in ("accuracy", "confusion",
                                                                                         "per_class")]
    assert r["images"] == 20 and r["skipped"] == [] and 0.5 <= r["accuracy"] <= 1  # 5 classes: chance is 0.2
    assert "top5_accuracy" not in r and sum(c["support"] for c in r["per_class"].values()) == 20
    assert np.trace(np.array(r["confusion"])) == round(r["accuracy"] * 20)
    assert len(r["most_confidently_wrong"]) == min(3, 20 - round(r["accuracy"] * 20))
    assert json.loads((out / "confusion.json").read_text())["confusion"] == r["confusion"]
    assert (out / "confusion.png").stat().st_size > 1000 and json.loads((out / "evaluation.json").read_text())


def test_a_class_the_bundle_does_not_know_is_one_line(held_out, tmp_path):
    train, test = held_out
    run_json("fit-head", train, "--cache-dir", tmp_path / "c", "--out", tmp_path / "m", "--val-fraction", "0")
    odd = tmp_path / "odd"
    shutil.copytree(test, odd)
    (odd / "animals").rename(odd / "zebras")
    line = one_line(run_cli("evaluate", tmp_path / "m", odd))
    assert "not classes of model" in line and "zebras" in line


def test_fit_head_with_a_validation_and_a_test_folder(held_out, tmp_path):
    """--val-dir replaces the random split, --test-dir is scored once; an image of the test folder that is also
    in training is counted and said."""
    train, test = held_out
    leaky = tmp_path / "leaky"
    shutil.copytree(test, leaky)
    shutil.copy(next((train / "tools").iterdir()), leaky / "tools" / "copy.jpg")
    proc = run_cli("fit-head", train, "--cache-dir", tmp_path / "c", "--out", tmp_path / "m", "--val-dir", test,
                   "--test-dir", leaky, "--json", check=True)
    r = json.loads(proc.stdout)
    assert (r["n_train"], r["n_val"], r["n_test"], r["test_in_train"]) == (40, 20, 21, 1)
    assert r["validation"] == f"--val-dir {test}" and "byte-identical to training images" in proc.stderr
    assert abs(r["test_accuracy"] * 21 - r["val_accuracy"] * 20) <= 1  # same 20 images, plus the copy
    odd = tmp_path / "odd"
    shutil.copytree(test, odd)
    (odd / "animals").rename(odd / "zebras")
    line = one_line(run_cli("fit-head", train, "--cache-dir", tmp_path / "c", "--out", tmp_path / "m2",
                            "--val-dir", odd))
    assert "--val-dir has class folder(s) the training data lacks: zebras" in line
