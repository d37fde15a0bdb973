"""WebDataset shards as extract's input (featpipe/tar_input.py, tar_reader.py): real .tar files built here from the
shipped photos with the standard library's tarfile. The same photos as an ImageFolder and as shards give the same
rows; damaged shards keep what came before the damage; unchanged shards are not read again."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from featpipe import fileindex
from featpipe.errors import UserError
from featpipe.tar_input import Sample, expand, samples, shard_args, split_name
from tests.conftest import one_line, run_cli, run_json

PATTERN = "train-{000000..000002}.tar"


def photos(shipped: Path) -> list[tuple[str, Path]]:
    """(class, file) of every shipped photo, in the order featpipe sorts an ImageFolder's paths."""
    return [(c.name, f) for c in sorted(p for p in shipped.iterdir() if p.is_dir()) for f in sorted(c.iterdir())]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample(key: str, data: bytes, label: str, how: str = "cls") -> list[tuple[str, bytes]]:
    """One WebDataset sample: the image and its label as a cls member (text) or a json member's "label"."""
    text = label.encode() if how == "cls" else json.dumps({"label": label, "source": "gcompris"}).encode()
    return [(f"{key}.jpg", data), (f"{key}.{how}", text)]


def wait_until_indexable(*paths: Path) -> None:
    """The file index records a file only once its ctime is RACY_SECONDS old when read (fileindex.py)."""
    newest = max(os.stat(p).st_ctime for p in paths)
    time.sleep(max(0.0, newest + fileindex.RACY_SECONDS + 0.2 - time.time()))


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shipped) -> Path:
    """The 196 shipped photos as 3 shards, in the ImageFolder's order (so the two give identical splits): labels
    in cls members in shards 0 and 2, in a json member's "label" in shard 1."""
    d = tmp_path_factory.mktemp("wds")
    items = photos(shipped)
    per = -(-len(items) // 3)
    for k in range(3):
        part = list(enumerate(items))[k * per:(k + 1) * per]
        how = "json" if k == 1 else "cls"
        write_tar(d / f"train-{k:06d}.tar",
                  [m for i, (c, f) in part for m in sample(f"{i:06d}", f.read_bytes(), c, how)])
    return d


@pytest.fixture
def small(tmp_path, shipped) -> tuple[Path, list[bytes]]:
    """Six real photos as raw bytes and a folder for shards."""
    return tmp_path, [f.read_bytes() for _, f in photos(shipped)[::33][:6]]


# --- patterns (no model) ---

def test_brace_patterns_globs_and_paths_name_the_same_shards_in_order(shards, monkeypatch):
    monkeypatch.chdir(shards)
    want = [Path(f"train-{k:06d}.tar") for k in range(3)]
    assert expand([PATTERN]) == want
    assert expand(["train-*.tar"]) == want
    assert expand(["train-00000[0-2].tar"]) == want
    assert expand([str(p) for p in want]) == want  # what the shell passes for an unquoted pattern
    assert expand(["train-000002.tar", PATTERN, str(shards / "train-000000.tar")]) == [want[2], want[0], want[1]]
    assert shard_args([Path(PATTERN)]) == [PATTERN] and shard_args(want) == [str(p) for p in want]
    assert shard_args([Path("data")]) is None and shard_args(None) is None


@pytest.mark.parametrize("args, message", [
    (["nothing-*.tar"], "no shard matches nothing-*.tar"),
    (["train-{000000..000003}.tar"], "shard not found: train-000003.tar (from train-{000000..000003}.tar)"),
    (["train-{000000.tar"], "unbalanced braces"),
    (["folder.tar"], "shard folder.tar is not a file"),
])
def test_a_pattern_that_names_no_shard_is_a_user_error(shards, monkeypatch, args, message):
    monkeypatch.chdir(shards)
    (shards / "folder.tar").mkdir(exist_ok=True)
    with pytest.raises(UserError) as e:
        expand(args)
    assert message in str(e.value)


def test_shards_and_a_folder_do_not_mix():
    with pytest.raises(UserError, match="data is not a .tar shard"):
        shard_args([Path("a.tar"), Path("data")])
    with pytest.raises(UserError, match="got 2 arguments"):
        shard_args([Path("data"), Path("more")])


# --- reading shards (no model) ---

def test_members_group_into_samples_with_their_labels(small):
    d, jpg = small
    tar = write_tar(d / "s.tar", [
        *sample("000000", jpg[0], "fishes"), *sample("000001", jpg[1], " 3\n"),  # a class name; an index, as text
        *sample("000002", jpg[2], "tools", "json"),
        ("000003.jpg", jpg[3]), ("000003.json", b'{"label": 2}'),  # a json index
        ("000004.txt", b"a caption"), ("000004.cls", b"animals"),  # no image member
        ("d/000005.jpg", jpg[4]), ("d/000005.seg.png", b"mask"), ("d/000005.cls", b"fishes"),  # a mask is no image
        ("000006.jpg", jpg[5]), ("000006.png", jpg[0]),  # two images: the first is the sample's
        ("000007.jpg", b"not an image"), ("000007.cls", b"tools"),  # bytes are the decoder's to judge
        ("000008.jpg", jpg[1]), ("000008.cls", b"\xff\xfe"),
        ("000009.jpg", jpg[2]), ("000009.json", b"{not json"),
        ("000010.jpg", jpg[3]), ("000010.json", b"[1, 2]"), ("000011.jpg", jpg[4]), ("000011.json", b'{"id": 7}'),
    ])
    got = list(samples(tar))
    assert got == [
        Sample("000000.jpg", "fishes", jpg[0]), Sample("000001.jpg", "3", jpg[1]),
        Sample("000002.jpg", "tools", jpg[2]), Sample("000003.jpg", "2", jpg[3]),
        Sample("000004", reason="no image member (jpg, jpeg, png, webp, ...) in this sample"),
        Sample("d/000005.jpg", "fishes", jpg[4]), Sample("000006.jpg", "", jpg[5]),
        Sample("000006.png", "", reason="a second image in sample 000006: only 000006.jpg is embedded"),
        Sample("000007.jpg", "tools", b"not an image"),
        Sample("000008.jpg", reason="cls member is not UTF-8 text"),
        Sample("000009.jpg", reason="json member is not JSON"),
        Sample("000010.jpg", reason="json member is not an object"), Sample("000011.jpg", "", jpg[4]),  # no label
    ]
    assert split_name("d/000123.seg.png") == ("d/000123", "seg.png") and split_name("._000.jpg") is None


def test_a_truncated_shard_keeps_the_samples_before_the_damage(small):
    d, jpg = small
    whole = write_tar(d / "whole.tar", [m for i, b in enumerate(jpg) for m in sample(f"{i:06d}", b, "fishes")])
    with tarfile.open(whole) as tar:
        fourth = tar.getmember("000003.jpg")
    data = whole.read_bytes()
    cuts = {"in a member's data": fourth.offset_data + 1000, "in a header": fourth.offset + 100,
            "at a header": fourth.offset}
    for where, at in cuts.items():
        cut = d / "cut.tar"
        cut.write_bytes(data[:at])
        got = list(samples(cut))
        kept = 3 if where == "in a member's data" else 2  # at a header, the sample before may have lost members
        assert [s.member for s in got[:-1]] == [f"{i:06d}.jpg" for i in range(kept)], where
        assert all(s.data == jpg[i] and s.label == "fishes" for i, s in enumerate(got[:-1]))
        assert got[-1].member is None and got[-1].data is None, where
        assert got[-1].reason.startswith("damaged or truncated tar (") and \
            f"in sample {kept:06d}: the rest of the shard is not read; the {kept} sample(s) before it are kept" \
            in got[-1].reason, (where, got[-1].reason)
    assert [s.member for s in samples(whole)] == [f"{i:06d}.jpg" for i in range(6)]


def test_what_is_not_a_tar_is_one_damaged_shard(tmp_path):
    (tmp_path / "text.tar").write_text("hello\n" * 200)
    (tmp_path / "empty.tar").write_bytes(b"")
    for name in ("text.tar", "empty.tar", "missing.tar"):
        got = list(samples(tmp_path / name))
        assert len(got) == 1 and got[0].member is None and got[0].data is None, name
        assert ("unreadable" if name == "missing.tar" else "the 0 sample(s) before it are kept") in got[0].reason


# --- extraction (the model) ---

@pytest.mark.slow
def test_folder_and_shards_give_the_same_rows_and_cv_accuracy(shards, shipped, tmp_path):
    from featpipe.extract import ExtractConfig
    from featpipe.features import load_features
    from featpipe.heads import HeadConfig, cross_validate

    folder = load_features(ExtractConfig(data_dir=shipped, cache_dir=tmp_path / "a"), progress=False)
    tars = load_features(ExtractConfig(shards=[str(shards / PATTERN)], cache_dir=tmp_path / "b"), progress=False)
    assert folder.result.computed == tars.result.computed == len(tars.paths) == 196
    assert {m.sha256: m.label for m in folder.result.members} == {m.sha256: m.label for m in tars.result.members}
    assert tars.paths[0] == f"{shards / 'train-000000.tar'}#000000.jpg"
    assert folder.classes == tars.classes and np.array_equal(folder.y, tars.y)  # same order: identical splits
    assert np.array_equal(folder.groups, tars.groups)
    cosine = np.sum(folder.X * tars.X, 1) / np.linalg.norm(folder.X, axis=1) / np.linalg.norm(tars.X, axis=1)
    assert cosine.min() >= 0.999
    cv = [cross_validate(f.X, f.y, f.classes, 5, HeadConfig(), f.groups)[0] for f in (folder, tars)]
    assert abs(cv[0] - cv[1]) <= 0.01 and cv[1] > 0.8


@pytest.fixture(scope="module")
def cold(shards, tmp_path_factory) -> tuple[dict, Path]:
    """A first extract of the shards (quoted brace pattern), once they are old enough for the file index."""
    wait_until_indexable(*shards.glob("*.tar"))
    cache = tmp_path_factory.mktemp("wds-cache")
    return run_json("extract", shards / PATTERN, "--cache-dir", cache), cache


def test_quoted_and_unquoted_patterns_extract_once_and_unchanged_shards_are_not_read(cold, shards):
    first, cache = cold
    assert (first["images"], first["computed"], first["reused"], first["skipped"]) == (196, 196, 0, [])
    assert first["data_dir"] == str(shards / PATTERN)
    unquoted = [shards / f"train-{k:06d}.tar" for k in range(3)]  # what bash makes of train-{000000..000002}.tar
    for args in (unquoted, [shards / "train-*.tar"]):
        again = run_json("extract", *args, "--cache-dir", cache)
        assert (again["images"], again["computed"], again["reused"], again["skipped"]) == (196, 0, 196, [])
        assert "read" not in again["stage_seconds"] and "hash" not in again["stage_seconds"], again["stage_seconds"]


def test_export_embeddings_takes_a_shard_pattern(cold, shards, tmp_path):
    import pyarrow.parquet as pq

    _, cache = cold
    r = run_json("export-embeddings", shards / PATTERN, "--cache-dir", cache, "--out", tmp_path / "e.parquet")
    table = pq.read_table(tmp_path / "e.parquet").to_pydict()
    assert r["rows"] == 196 and table["path"][0] == f"{shards / 'train-000000.tar'}#000000.jpg"
    assert sorted(set(table["label"])) == ["animals", "fishes", "monuments", "renewable_energy", "tools"]


def test_fit_head_on_shards_scores_as_on_the_folder(cold, shards, shipped, tmp_path):
    _, cache = cold  # the folder's photos are the shards' bytes: their rows are cached already
    folder, tars = [run_json("fit-head", data, "--cache-dir", cache, "--cv", "5", "--out", tmp_path / name)
                    for name, data in (("folder", shipped), ("shards", shards / PATTERN))]
    assert folder["class_counts"] == tars["class_counts"] and folder["n_val"] == tars["n_val"] == 40
    assert abs(folder["cv_accuracy_mean"] - tars["cv_accuracy_mean"]) <= 0.01
    assert folder["val_accuracy"] == tars["val_accuracy"] and tars["data_dir"] == str(shards / PATTERN)


def test_corrupt_members_and_truncated_shards_are_skipped_and_listed_again_unread(small):
    d, jpg = small
    write_tar(d / "a-0.tar", [*sample("000000", jpg[0], "fishes"), *sample("000001", b"GIF89a and no more", "tools")])
    whole = write_tar(d / "a-1.tar", [m for i in range(2, 6) for m in sample(f"{i:06d}", jpg[i], "animals")])
    with tarfile.open(whole) as tar:
        cut = tar.getmember("000003.jpg").offset_data + 1000  # into the second sample's image
    whole.write_bytes(whole.read_bytes()[:cut])
    wait_until_indexable(d / "a-0.tar", whole)
    runs = [run_json("extract", d / "a-{0,1}.tar", "--cache-dir", d / "c") for _ in range(2)]
    for r in runs:
        assert (r["images"], r["computed"] + r["reused"]) == (4, 2)  # two photos, a corrupt member, a damaged tail
        assert [s["path"] for s in r["skipped"]] == [f"{d / 'a-0.tar'}#000001.jpg", str(whole)]
        assert "image" in r["skipped"][0]["reason"]
        assert "in sample 000003: the rest of the shard is not read; the 1 sample(s) before it are kept" \
            in r["skipped"][1]["reason"]
    assert runs[0]["computed"] == 2 and (runs[1]["computed"], runs[1]["decoder"]) == (0, "none")
    assert "read" not in runs[1]["stage_seconds"]  # the corrupt member's reason came from the index
    other = "fp32" if runs[0]["precision"] == "bf16" else "bf16"  # another cache beside the same file index
    r = run_json("extract", d / "a-{0,1}.tar", "--cache-dir", d / "c", "--precision", other)
    assert (r["computed"], len(r["skipped"])) == (2, 2) and "read" in r["stage_seconds"]  # it lacks their rows


def test_a_pattern_that_matches_nothing_is_one_line(tmp_path):
    line = one_line(run_cli("extract", tmp_path / "train-*.tar", "--cache-dir", tmp_path / "c"))
    assert line == f"featpipe: error: no shard matches {tmp_path / 'train-*.tar'}"
    line = one_line(run_cli("extract", tmp_path / "a.tar", tmp_path, "--cache-dir", tmp_path / "c"))
    assert "not a .tar shard" in line
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "s-0.tar", [("000000.cls", b"fishes")])
    line = one_line(run_cli("extract", tmp_path / "shards", "--cache-dir", tmp_path / "c"))
    assert line.endswith(f"(WebDataset shards? pass them as '{tmp_path / 'shards'}/*.tar')"), line
    write_tar(tmp_path / "empty.tar", [])
    line = one_line(run_cli("extract", tmp_path / "empty.tar", "--cache-dir", tmp_path / "c"))
    assert line == f"featpipe: error: no valid image in {tmp_path}: no sample to embed", line


def test_audit_takes_labelled_shards_only(small):
    d, jpg = small
    write_tar(d / "u.tar", [*sample("000000", jpg[0], "fishes"), ("000001.jpg", jpg[1])])
    line = one_line(run_cli("audit", d / "u.tar", "--cache-dir", d / "c", "--out", d / "audit"))
    assert line.endswith(f"1 sample(s) of the shards have no label (a cls member, or a json member's \"label\"), "
                         f"e.g. {d / 'u.tar'}#000001.jpg: each needs one here"), line
