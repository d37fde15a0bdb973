"""Identical files (same sha256) stay on one side of every split and fold, and the run says how many there are."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from featpipe.extract import ExtractConfig
from featpipe.features import load_features
from featpipe.fit_head import FitConfig, fit_and_save
from featpipe.heads import HeadConfig
from featpipe.splits import content_groups, kfold, val_split
from tests.conftest import make_subset, run_cli


def twice(src: Path, dst: Path) -> Path:
    """Every file of an ImageFolder stored twice in its class folder, under two names."""
    for f in sorted(src.rglob("*")):
        if f.is_file():
            out = dst / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, out)
            shutil.copy(f, out.with_name("copy-" + out.name))
    return dst


def sides(groups: np.ndarray, a: np.ndarray, b: np.ndarray) -> set:
    return set(groups[a]) & set(groups[b])


def test_splits_and_folds_never_separate_copies():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    groups = rng.integers(0, 50, len(y)) * 3 + y  # many groups of 1-4 copies, each within one class
    for seed in range(5):
        s = val_split(y, ["a", "b", "c"], 0.25, seed, groups=groups)
        assert not sides(groups, s.train, s.val) and len(s.train) + len(s.val) == len(y)
        for tr, te in kfold(y, 4, seed, groups):
            assert not sides(groups, tr, te)
            assert sorted(np.concatenate([tr, te])) == list(range(len(y)))


def test_without_copies_the_splits_are_the_row_level_ones():
    """Singleton groups give exactly the split and folds of before (cached results and reports stay comparable)."""
    y = np.repeat(np.arange(4), 9)
    distinct = content_groups([f"{i:064x}" for i in range(len(y))])
    np.testing.assert_array_equal(val_split(y, list("abcd"), 0.2, 3).val,
                                  val_split(y, list("abcd"), 0.2, 3, groups=distinct).val)
    for (a, b), (c, d) in zip(kfold(y, 3, 1), kfold(y, 3, 1, distinct)):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)


@pytest.fixture(scope="module")
def doubled(tmp_path_factory, shipped, warm_cache) -> tuple[Path, Path, Path]:
    """30 shipped photos per class, distinct and stored twice; both extracted into a copy of the warm cache."""
    root = tmp_path_factory.mktemp("dup")
    distinct = make_subset(shipped, root / "distinct", 30)
    cache = root / "cache"
    shutil.copytree(warm_cache, cache)
    return distinct, twice(distinct, root / "twice"), cache


def test_copies_do_not_inflate_val_accuracy(doubled, tmp_path):
    """As the issue's 150-pair set: with copies split apart, val accuracy rose to ~1.0; kept together it stays in
    the distinct set's range, and no sha256 is ever on both sides."""
    distinct, twice_dir, cache = doubled
    n = sum(1 for p in distinct.rglob("*") if p.is_file())  # 141: some shipped classes have fewer than 30
    f = load_features(ExtractConfig(twice_dir, cache_dir=cache), progress=False)
    assert len(f.paths) == 2 * n and len(set(f.groups)) == n
    for seed in (0, 1, 2):
        s = val_split(f.y, f.classes, 0.2, seed, groups=f.groups)
        assert not sides(f.groups, s.train, s.val)
        runs = {name: fit_and_save(FitConfig(ExtractConfig(d, cache_dir=cache), HeadConfig(seed=seed), cv=3,
                                             out=tmp_path / f"{name}{seed}"), progress=False)
                for name, d in (("distinct", distinct), ("twice", twice_dir))}
        assert runs["twice"]["n_val"] == 2 * runs["distinct"]["n_val"]
        assert abs(runs["twice"]["val_accuracy"] - runs["distinct"]["val_accuracy"]) <= 0.05, runs
        assert runs["twice"]["duplicate_files"] == n and runs["distinct"]["duplicate_files"] == 0


def test_cli_counts_copies_and_names_conflicting_labels(doubled, tmp_path):
    _, twice_dir, cache = doubled
    data = tmp_path / "data"
    shutil.copytree(twice_dir, data)
    moved = next((data / "fishes").glob("copy-*"))
    shutil.move(moved, data / "tools" / moved.name)  # identical bytes now filed under two classes
    proc = run_cli("fit-head", data, "--cache-dir", cache, "--out", tmp_path / "m", "--json", check=True)
    assert f"{len(list(data.rglob('*.jpg'))) // 2} duplicate file(s)" in proc.stderr
    warning = [line for line in proc.stderr.splitlines() if "identical bytes under different classes" in line]
    assert len(warning) == 1 and f"tools/{moved.name} (tools)" in warning[0] and "(fishes)" in warning[0]


def test_uneven_copies_still_leave_a_group_in_training():
    """A class of one file plus nine copies of another: holding out whole groups must not need every group."""
    y = np.array([0] * 10 + [1] * 10)
    groups = np.array(list(range(10)) + [10] + [11] * 9)
    for seed in range(40):
        s = val_split(y, ["a", "b"], 0.2, seed, groups=groups)
        assert set(y[s.train]) == {0, 1} and set(y[s.val]) == {0, 1} and not sides(groups, s.train, s.val)
