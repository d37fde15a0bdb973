"""bench/throughput.py --small runs end to end and reports every figure; every pipeline it times computes the same
embeddings. Nothing here asserts a speed: CI machines are shared and noisy, bench/README.md holds the numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("forward_img_s", "extract_img_s", "naive_img_s", "cold_seconds", "warm_seconds", "head_fit_seconds",
           "finetune_epoch_seconds", "extract_vs_forward", "extract_vs_naive", "cold_vs_warm")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "throughput.py"), "--small", "--workdir", str(d),
                           "--json", str(d / "out.json")], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "extract / naive" in proc.stdout  # the human table
    return json.loads((d / "out.json").read_text())


def test_every_figure_is_reported(report):
    for k in FIGURES:
        assert isinstance(report[k], (int, float)) and report[k] > 0, (k, report[k])
    assert report["decode_img_s"]["pil"] > 0 and all(v > 0 for v in report["decode_img_s"].values())
    if report["device"] == "cpu":  # one model per core: the forward ceiling without op-level threading
        assert report["forward_img_s_replicas"] > 0 and report["extract_vs_forward_replicas"] > 0
    assert report["images"] == 200 and report["repeats"] == 1
    m = report["machine"]
    assert {"cpu", "cores_usable", "torch", "commit", "date"} <= set(m) and m["cores_usable"] >= 1


def test_every_path_computes_the_same_embeddings(report):
    """Every decoder inside extract (Pillow, DALI, torchvision's nvJPEG path or its CPU twin) and the naive torchvision
    pipeline (fp32): cosine >= 0.98 on every image."""
    agreement = report["agreement_cosine"]
    kinds = {k.split("-")[0] for k in report["decode_img_s"]} - {"pil"}
    assert "torchvision" in kinds and set(report["extract_img_s_by_decoder"]) == {"pil", *kinds}
    expected = {"naive_vs_pil"} | {f"{a}_vs_{k}" for k in kinds for a in ("pil", "naive")}
    assert expected <= set(agreement)
    for name in expected:
        assert agreement[name]["n"] == report["images"], name
        assert agreement[name]["min"] >= 0.98, (name, agreement[name])


def test_heads_bench_reports_every_procedure(tmp_path):
    """bench/heads.py at a toy size: every procedure at every size, with its time, test accuracy and search."""
    out = tmp_path / "heads.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "heads.py"), "--rows", "1500", "--sizes", "800",
                           "--classes", "4", "--dim", "64", "--json", str(out)], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [(x["rows"], x["procedure"].split(",")[0]) for x in r["results"]] == [
        (n, kind) for n in (800, 1500) for kind in ("logistic", "logistic", "mlp", "mlp")]
    for x in r["results"]:
        assert x["seconds"] > 0 and 0.25 < x["test_accuracy"] <= 1
        assert ("c_search" in x) == x["procedure"].startswith("logistic")
    assert {"cpu", "cores_usable", "commit", "date"} <= set(r["machine"])


def test_file_index_bench_finds_every_file_unchanged(tmp_path):
    """bench/file_index.py at a toy size: the check asserts every synthetic file is found unchanged."""
    out = tmp_path / "index.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "file_index.py"), "--files", "3000", "--repeats",
                           "1", "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = json.loads(out.read_text())["trees"].values()
    assert r["seconds"] > 0 and r["added_mib"] >= 0


def test_scale_bench_reports_every_figure(tmp_path):
    """bench/scale.py at a toy size: every operation at every level, and what it added stays readable."""
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "scale.py"), "--rows", "3000", "--dim", "16",
                           "--repeats", "1", "--workdir", str(tmp_path / "w"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for k in ("add_1k_seconds", "add_1k_peak_rss_mb", "lookup_seconds", "index_check_seconds", "compact_seconds"):
        assert set(r[k]) == {"0", "3000"} and all(v > 0 for v in r[k].values()), (k, r[k])
    assert set(r["read_1k_seconds"]) == {"3000"} and r["add_1k_ratio_top_vs_empty"] > 0
    info = json.loads(subprocess.run([sys.executable, "-m", "featpipe", "cache", "info", "--cache-dir",
                                      str(tmp_path / "w" / "cache-3000"), "--json"], capture_output=True,
                                     text=True, cwd=REPO, check=True).stdout)
    assert info["caches"][0]["rows"] == 3000 + 1000 and info["caches"][0]["shards"] == 1  # compacted


def test_audit_bench_finds_what_it_planted(tmp_path):
    """bench/audit_scale.py at a toy size: every phase timed; planted near copies found (flat index here)."""
    out = tmp_path / "audit.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "audit_scale.py"), "--rows", "2000", "--classes", "4",
                           "--dim", "64", "--planted", "0.02", "--json", str(out)], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(r["seconds"]) == {"duplicates", "label_issues", "cv", "files"} and all(
        v > 0 for v in r["seconds"].values())
    assert r["planted_copies_found"] == "40/40" and r["label_issues"] > 0


def test_extract_scale_bench_copies_are_distinct_files_with_the_same_pixels(tmp_path):
    """bench/extract_scale.py at a toy size: its copies carry their own hash (all computed, none reused) and decode
    to their source's pixels, so scale comes from files, not from other images; every run and sample reported."""
    from PIL import Image

    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "extract_scale.py"), "--images", "40", "--distinct",
                           "10", "--sizes", "small", "--device", "cpu", "--repeats", "1", "--gil-intervals",
                           "0.001,0.005", "--workdir", str(tmp_path / "w"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [x["gil_interval"] for x in r["runs"]] == [0.001, 0.005] and set(r["img_s_median"]) == {"0.001", "0.005"}
    assert r["runs"][-1]["samples"] and all("read" in x["stages"] and x["computed"] == 40 for x in r["runs"])
    copies = sorted((tmp_path / "w" / "images-40-10-small").rglob("*.jpg"))
    first, again = copies[0], copies[0].with_name(f"{int(copies[0].stem) + 10:07d}.jpg")  # same source, i % 10
    assert len(copies) == 40 and first.read_bytes() != again.read_bytes()
    assert Image.open(first).tobytes() == Image.open(again).tobytes()


def test_feature_sets_scale_bench_compares_on_a_sample_and_reports_memory(tmp_path):
    """bench/feature_sets_scale.py at a toy size: the sampled choice saw about --choose-rows rows, the other every
    one; both picked sets score on fresh rows; side by side in place adds less memory than the old hstack."""
    out = tmp_path / "fs.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "feature_sets_scale.py"), "--rows", "3000",
                           "--classes", "4", "--dim", "64", "--choose-rows", "1500", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    sample, every = r["results"]
    assert 1490 <= sample["compared_on_rows"] <= 1510 and every["compared_on_rows"] == 3000
    assert all(x["seconds"] > 0 and 0.3 < x["test_accuracy"] <= 1 and x["chosen"] for x in r["results"])
    before, now = r["memory"]
    assert now["peak_added_mib"] < before["peak_added_mib"]
