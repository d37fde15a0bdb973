"""`featpipe export-embeddings`: Parquet and npy files that other tools read back as the cached rows."""

from __future__ import annotations

import csv

import numpy as np
import pyarrow.parquet as pq

from tests.conftest import one_line, run_cli, run_json
from tests.faults import faultkit as fk


def test_parquet_and_npy_hold_the_cached_rows(small_data, tmp_path):
    cache = tmp_path / "c"
    r = run_json("export-embeddings", small_data, "--cache-dir", cache, "--out", tmp_path / "e.parquet")
    assert (r["rows"], r["dim"], r["format"]) == (20, 1280, "parquet")
    rows = fk.read_rows(cache)
    want = dict(zip(rows.sha256, rows.embeddings))
    t = pq.read_table(tmp_path / "e.parquet")
    assert t.num_rows == 20 and t.column_names == ["path", "label", "sha256", "embedding"]
    paths = t["path"].to_pylist()
    assert paths == sorted(paths) and set(t["label"].to_pylist()) == {p.name for p in small_data.iterdir()}
    X = np.array(t["embedding"].to_pylist(), np.float32)
    np.testing.assert_array_equal(X, np.stack([want[h] for h in t["sha256"].to_pylist()]))
    n = run_json("export-embeddings", small_data, "--cache-dir", cache, "--out", tmp_path / "e.npy")  # npy by name
    assert n["files"] == [str(tmp_path / "e.npy"), str(tmp_path / "e.csv")] and n["format"] == "npy"
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), X)
    with open(tmp_path / "e.csv") as fh:
        assert [row["path"] for row in csv.DictReader(fh)] == paths
    assert sorted(p.name for p in tmp_path.glob("e*")) == ["e.csv", "e.npy", "e.parquet"]
    assert not list(tmp_path.glob(".*"))  # no temp files left


def test_a_bad_format_is_one_line(small_data, tmp_path):
    line = one_line(run_cli("export-embeddings", small_data, "--format", "csv", "--out", tmp_path / "x"))
    assert "--format must be one of parquet, npy" in line
    line = one_line(run_cli("export-embeddings", small_data, "--format", "npy", "--out", tmp_path / "x.parquet"))
    assert line.endswith("x.parquet ends in .parquet but --format is npy: name the file .npy, or leave --format out")
