"""report.write on synthetic reports shaped like experiment.run's: the confusion plot scales with the class count,
report.md lists the most confused pairs past 30 classes and links the saved models."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featpipe.report import PAIRS_ABOVE, confusion_figure, write

NAMES = ["cat", "dog", "renewable_energy", "monuments", "tools", "fishes", "a_rather_long_class_name"]


def classes(n: int) -> list[str]:
    """n distinct names of varied length, as real class folders have."""
    return [f"{NAMES[i % len(NAMES)]}_{i}" for i in range(n)]


def confusion(n: int, seed: int = 0) -> list[list[int]]:
    """Mostly right, a few errors per class, and one clear worst pair: class 3 read as the last class, 9 times."""
    rng = np.random.default_rng(seed)
    m = np.diag(rng.integers(5, 20, n))
    for i in range(n):
        m[i, (i + 1 + rng.integers(0, n - 1)) % n] += rng.integers(0, 3)
    m[3, n - 1] = 9
    return m.tolist()


def report(n: int, out) -> dict:
    """The keys report.write reads, as experiment.run fills them (one backbone, head and finetune rows)."""
    m = confusion(n)
    names = classes(n)
    n_val = int(np.sum(m))
    rows = [{"method": method, "backbone": "mobilenet_v2", "train_accuracy": 1.0, "val_accuracy": acc,
             "train_seconds": secs, "cv_accuracy_mean": None, "cv_accuracy_std": None, "cv_folds": None,
             "speedup_vs_scratch": None, "meets_tutorial_task": True, "best_epoch": 1,
             "history": [{"epoch": 0, "val_accuracy": 0.8}, {"epoch": 1, "val_accuracy": acc}],
             "model_path": str(out / "models" / f"mobilenet_v2-{kind}")}
            for method, kind, acc, secs in (("head", "logistic", 0.8, 0.5), ("finetune", "finetuned", 0.85, 5.0))]
    return {"results": rows, "device": "cpu", "featpipe_version": "0.1.0",
            "backbones": {"mobilenet_v2": {}},
            "dataset": {"classes": names, "images_per_class": {c: 20 for c in names}, "n_train": 20 * n - n_val,
                        "n_val": n_val, "majority_val_accuracy": 0.05},
            "timings": {"one_time": {"mobilenet_v2": {"extract_seconds": 1.0, "prepare_seconds": 1.0}},
                        "training": {}, "total_seconds": 9.0},
            "best": {"method": "finetune", "backbone": "mobilenet_v2", "val_accuracy": 0.85, "confusion": m,
                     "model_path": rows[1]["model_path"]},
            "config": {"seed": 0, "head": "logistic"}}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[int, tuple]:
    """report.write at 5 and 50 classes: {n: (out dir, report)}."""
    done = {}
    for n in (5, 50):
        out = tmp_path_factory.mktemp(f"rep{n}")
        done[n] = out, write(report(n, out), out)
    return done


def test_confusion_png_grows_with_the_class_count(written):
    small, large = (Image.open(written[n][0] / "confusion.png").size for n in (5, 50))
    assert large[0] > 1.8 * small[0] and large[1] > 1.8 * small[1], (small, large)


def test_tick_labels_never_overlap_and_nothing_is_clipped():
    r = report(50, Path("/r"))
    fig = confusion_figure(r["best"]["confusion"], r["dataset"]["classes"], "a title")
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    ax = fig.axes[0]
    box = fig.bbox
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        extents = [t.get_window_extent(renderer) for t in labels]
        assert len(extents) == 50
        for a, b in itertools.pairwise(extents):
            assert not a.overlaps(b), (a, b)
        assert all(box.x0 <= e.x0 and e.x1 <= box.x1 and box.y0 <= e.y0 and e.y1 <= box.y1 for e in extents)
    title = ax.title.get_window_extent(renderer)
    assert box.x0 <= title.x0 and title.x1 <= box.x1 and title.y1 <= box.y1, (title, box)


def test_report_md_lists_the_most_confused_pairs_above_30_classes(written):
    md = (written[50][0] / "report.md").read_text()
    assert 50 > PAIRS_ABOVE and "| true | predicted | images |" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and line.count("|") == 4
            and not line.startswith(("| true", "| ---"))]
    assert rows[0] == f"| {classes(50)[3]} | {classes(50)[49]} | 9 |"  # the worst pair first
    counts = [int(r.split("|")[3]) for r in rows]
    assert 1 < len(rows) <= 10 and counts == sorted(counts, reverse=True)
    assert "| true | predicted |" not in (written[5][0] / "report.md").read_text()


def test_report_links_the_saved_models_relatively(written):
    out, r = written[5]
    md = (out / "report.md").read_text()
    assert "saved as [models/mobilenet_v2-finetuned](models/mobilenet_v2-finetuned)" in md
    assert "[models/mobilenet_v2-logistic](models/mobilenet_v2-logistic)" in md
    assert str(out) not in md  # relative, so the report dir can move
    saved = json.loads((out / "report.json").read_text())
    assert saved["best"]["model_path"] == str(out / "models" / "mobilenet_v2-finetuned")
