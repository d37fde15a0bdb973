"""--labels FILE: the shipped photos as a flat folder + CSV and + Parquet with a split column give the class-folder
run's rows and accuracy; unusable rows are listed and skipped; a file with none usable is one line, exit 2."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featpipe.errors import UserError
from featpipe.extract import ExtractConfig
from featpipe.features import load_features
from featpipe.fit_head import FitConfig, fit_and_save
from featpipe.heads import HeadConfig
from featpipe.manifest import read
from tests.conftest import one_line, run_cli, run_json


@pytest.fixture(scope="module")
def flat(tmp_path_factory, shipped) -> tuple[Path, list[tuple[str, str]]]:
    """Every shipped photo in one folder as <class>_<name> (the class-folder run's path order), and its rows."""
    d = tmp_path_factory.mktemp("flat") / "images"
    d.mkdir()
    rows = []
    for f in sorted(shipped.glob("*/*.jpg")):
        shutil.copy(f, d / f"{f.parent.name}_{f.name}")
        rows.append((f"{f.parent.name}_{f.name}", f.parent.name))
    return d, rows


def write_csv(path: Path, header: list[str], rows: list) -> Path:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


def test_flat_folder_and_csv_equal_the_class_folders(tmp_path, flat, warm_cache):
    d, rows = flat
    labels = write_csv(tmp_path / "labels.csv", ["filename", "label"], rows)
    folders = load_features(ExtractConfig(cache_dir=warm_cache), progress=False)
    listed = load_features(ExtractConfig(data_dir=d, cache_dir=warm_cache, labels=labels), progress=False)
    assert listed.result.computed == 0  # same bytes: every row from the cache
    assert listed.classes == folders.classes and (listed.y == folders.y).all()
    cos = (listed.X * folders.X).sum(1) / np.linalg.norm(listed.X, axis=1) / np.linalg.norm(folders.X, axis=1)
    assert cos.min() >= 0.999
    cv = [fit_and_save(FitConfig(extract=e, head=HeadConfig(), cv=5, out=tmp_path / str(k)), progress=False)
          ["cv_accuracy_mean"] for k, e in enumerate([ExtractConfig(cache_dir=warm_cache),
                                                      ExtractConfig(data_dir=d, cache_dir=warm_cache, labels=labels)])]
    assert abs(cv[0] - cv[1]) <= 0.01


def test_parquet_split_column_is_the_split(tmp_path, flat, warm_cache):
    d, rows = flat
    split = ["train", "train", "train", "val", "test"]
    table = pa.table({"path": [str(d / p) for p, _ in rows], "label": [c for _, c in rows],
                      "split": [split[i % 5] for i in range(len(rows))]})  # absolute paths this time
    pq.write_table(table, tmp_path / "labels.parquet")
    r = fit_and_save(FitConfig(extract=ExtractConfig(data_dir=d, cache_dir=warm_cache,
                                                     labels=tmp_path / "labels.parquet"),
                               head=HeadConfig(), out=tmp_path / "m"), progress=False)
    n = {s: sum(split[i % 5] == s for i in range(len(rows))) for s in ("train", "val", "test")}
    assert (r["n_train"], r["n_val"], r["n_test"]) == (n["train"], n["val"], n["test"])
    assert r["validation"].startswith("split column of") and r["test_in_train"] == 0 and r["test_accuracy"] > 0.8


def test_unusable_rows_are_listed_and_skipped(tmp_path, flat, capsys):
    d, rows = flat
    labels = write_csv(tmp_path / "l.csv", ["filename", "label", "split"],
                       [[rows[0][0], rows[0][1], "train"], ["gone.jpg", "tools", "train"], [rows[0][0], "tools", "val"],
                        [rows[1][0], "", "train"], [rows[2][0], "tools", "holdout"], [rows[3][0], "tools", "val"]])
    m = read(labels, d)
    assert [Path(f.path).name for f in m.files] == [rows[0][0], rows[3][0]]
    assert [s["reason"] for s in m.skipped] == ["no such file", "duplicate of row 1, which labels it 'animals': a "
                                                "conflict", "empty label",
                                                "split 'holdout' is not one of train, val, test"]
    assert "4 of 6 row(s) skipped" in capsys.readouterr().err
    with pytest.raises(UserError, match="no usable row"):
        read(write_csv(tmp_path / "none.csv", ["path", "label"], [["gone.jpg", "x"]]), d)
    with pytest.raises(UserError, match="label column"):
        read(write_csv(tmp_path / "nolabel.csv", ["path", "class"], [[rows[0][0], "x"]]), d)


@pytest.mark.parametrize("sep", ["\t", ";"])
def test_a_tab_or_semicolon_separated_file_reads_as_its_header_splits(tmp_path, flat, sep):
    d, rows = flat
    (tmp_path / "l.txt").write_text(f"filename{sep}label\n" + "".join(f"{p}{sep}{c}\n" for p, c in rows[:3]))
    assert [(Path(f.path).name, f.label) for f in read(tmp_path / "l.txt", d).files] == rows[:3]


def test_cli_extract_with_labels(tmp_path, flat, warm_cache):
    d, rows = flat
    labels = write_csv(tmp_path / "l.csv", ["filename", "label"], rows[:10] + [["gone.jpg", "tools"]])
    r = run_json("extract", d, "--labels", labels, "--cache-dir", warm_cache)
    assert r["images"] == 11 and [s["reason"] for s in r["skipped"]] == ["--labels row 11: no such file"]
    assert r["computed"] + r["reused"] + len(r["skipped"]) == r["images"]  # a skipped row counts as an input
    proc = run_cli("extract", d, "--labels", tmp_path / "missing.csv", "--cache-dir", warm_cache)
    assert proc.returncode == 2 and "no such file" in one_line(proc)


def test_the_same_file_by_another_path_and_a_repeated_column_are_refused(tmp_path, flat, capsys):
    d, rows = flat
    (d / "sub").mkdir(exist_ok=True)
    m = read(write_csv(tmp_path / "l.csv", ["path", "label"], [[rows[0][0], "a"], [f"sub/../{rows[0][0]}", "a"],
                                                               [str(d / rows[0][0]), "c"], [rows[1][0], "b"]]), d)
    assert [s["reason"] for s in m.skipped] == ["duplicate of row 1", "duplicate of row 1, which labels it 'a': a "
                                                "conflict"] and len(m.files) == 2
    with pytest.raises(UserError, match="appears twice"):
        read(write_csv(tmp_path / "dup.csv", ["path", "label", "label"], [[rows[0][0], "a", "b"]]), d)


def test_a_split_column_without_train_images_of_a_class_is_refused(tmp_path, flat, warm_cache):
    d, rows = flat
    split = [("val" if c == "tools" else "train") for _, c in rows]
    labels = write_csv(tmp_path / "l.csv", ["filename", "label", "split"],
                       [[p, c, s] for (p, c), s in zip(rows, split)])
    with pytest.raises(UserError, match="no image of class 'tools' in train"):
        fit_and_save(FitConfig(extract=ExtractConfig(data_dir=d, cache_dir=warm_cache, labels=labels),
                               head=HeadConfig(), out=tmp_path / "m"), progress=False)


def test_held_out_folders_are_read_as_folders_not_through_labels(tmp_path, flat, warm_cache, shipped):
    d, rows = flat
    labels = write_csv(tmp_path / "l.csv", ["filename", "label"], rows)
    r = fit_and_save(FitConfig(extract=ExtractConfig(data_dir=d, cache_dir=warm_cache, labels=labels),
                               head=HeadConfig(), out=tmp_path / "m", test_dir=shipped), progress=False)
    assert r["n_test"] == 196 and r["test_in_train"] == 196


@pytest.fixture
def split_parquet(tmp_path, flat) -> tuple[Path, Path, dict[str, int]]:
    d, rows = flat
    split = ["train", "train", "train", "val", "test"]
    pq.write_table(pa.table({"path": [p for p, _ in rows], "label": [c for _, c in rows],
                             "split": [split[i % 5] for i in range(len(rows))]}), tmp_path / "labels.parquet")
    return d, tmp_path / "labels.parquet", {s: sum(split[i % 5] == s for i in range(len(rows))) for s in split}


def test_scratch_takes_the_split_column_and_leaves_its_test_rows_out(split_parquet, capsys):
    from featpipe.train_images import scan_images

    d, labels, n = split_parquet
    images = scan_images(d, "mobilenet_v2", 0.2, 0, labels)
    assert (len(images.split.train), len(images.split.val), len(images.paths)) == (n["train"], n["val"],
                                                                                   n["train"] + n["val"])
    assert images.validation == f"split column of {labels}" and "test rows" in capsys.readouterr().err


def test_evaluate_scores_only_the_split_columns_test_rows(tmp_path, split_parquet, warm_cache):
    from featpipe.evaluate import EvaluateConfig, evaluate

    d, labels, n = split_parquet
    fit = fit_and_save(FitConfig(extract=ExtractConfig(data_dir=d, cache_dir=warm_cache, labels=labels),
                                 head=HeadConfig(), out=tmp_path / "m"), progress=False)
    r = evaluate(EvaluateConfig(model=tmp_path / "m", data_dir=d, labels=labels))
    assert r["images"] == fit["n_test"] == n["test"] and r["accuracy"] > 0.8 and r["skipped"] == []
    t = pq.read_table(labels).to_pydict()
    more = write_csv(tmp_path / "more.csv", list(t), [*zip(*t.values()), ["gone.jpg", "tools", "test"]])
    again = evaluate(EvaluateConfig(model=tmp_path / "m", data_dir=d, labels=more))
    assert again["images"] == r["images"] and again["skipped"] == [
        {"path": str(d / "gone.jpg"), "reason": f"--labels row {len(t['path']) + 1}: no such file"}]


@pytest.mark.slow
def test_finetune_takes_the_split_column(split_parquet, warm_cache, tmp_path):
    from featpipe.train import TrainConfig, finetune, training_data

    d, labels, n = split_parquet
    cfg = TrainConfig(data_dir=d, labels=labels, cache_dir=warm_cache, epochs=1, unfreeze_blocks=1,
                      out=tmp_path / "ft")
    res = finetune(cfg, training_data(cfg), log=lambda s: None)
    assert (res.n_train, res.n_val, res.test["n_test"]) == (n["train"], n["val"], n["test"])
    assert res.validation == f"split column of {labels}" and res.test["test_accuracy"] > 0.8


def test_scratch_refuses_a_split_column_without_train_images_of_a_class(tmp_path, flat):
    from featpipe.train_images import scan_images

    d, rows = flat
    labels = write_csv(tmp_path / "l.csv", ["filename", "label", "split"],
                       [(p, c, "test" if c == "animals" else "train" if i % 3 else "val")
                        for i, (p, c) in enumerate(rows)])
    with pytest.raises(UserError, match="puts no image of class 'animals' in train"):
        scan_images(d, "mobilenet_v2", 0.2, 0, labels)


def test_non_utf8_names_in_a_label_file_raw_or_as_featpipe_writes_them(tmp_path, shipped):
    """Linux names may be any bytes: a CSV may hold them raw, or percent-encoded as featpipe's own outputs do."""
    from featpipe.dataset import as_text

    d = tmp_path / "images"
    d.mkdir()
    photos = sorted(shipped.glob("*/*.jpg"))[:2]
    names = [os.fsdecode(b"caf\xe9-%d.jpg" % i) for i in range(2)]
    for src, name in zip(photos, names):
        shutil.copy(src, d / name)
    raw = tmp_path / "raw.csv"
    raw.write_bytes(b"filename,label\n" + b"".join(os.fsencode(n) + b",a\n" for n in names))
    encoded = write_csv(tmp_path / "encoded.csv", ["filename", "label"], [(as_text(n), "a") for n in names])
    for labels in (raw, encoded):
        assert [f.path for f in read(labels, d).files] == [str(d / n) for n in names]
