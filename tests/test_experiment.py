"""`featpipe experiment`: a short real run on small data, report files agreeing with each other, configs, errors."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from conftest import held_out_folders, make_subset, run_cli, run_json

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, shipped) -> tuple[dict, Path, Path, str]:
    """One short real experiment on 5 classes x 4 photos, shared by the tests below: (report, out, data, stderr)."""
    tmp = tmp_path_factory.mktemp("experiment")
    data = make_subset(shipped, tmp / "data", 4)
    config = tmp / "quick.toml"
    config.write_text('[experiment]\nout = "ignored-because-the-flag-wins"\ncv = 3\n'
                      '[finetune]\nepochs = 1\nunfreeze_blocks = 2\n[scratch]\nepochs = 1\n')
    out = tmp / "rep"
    proc = run_cli("experiment", data, "--backbones", "mobilenet_v2", "--config", config, "--out", out,
                   "--cache-dir", tmp / "cache", "--json", check=True)
    return json.loads(proc.stdout), out, data, proc.stderr


def test_experiment_writes_consistent_reports(quick_run):
    r, out, _, stderr = quick_run
    assert "| method | backbone |" in stderr and "(3-fold CV " in stderr  # the table, beside the JSON
    for name in ("report.json", "report.md", "report.png", "confusion.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "report.json").read_text()) == r  # --json prints what report.json holds
    assert [(x["method"], x["backbone"]) for x in r["results"]] == [
        ("scratch", "mobilenet_v2"), ("head", "mobilenet_v2"), ("finetune", "mobilenet_v2")]
    for x in r["results"]:
        assert {"train_accuracy", "val_accuracy", "train_seconds", "history", "meets_tutorial_task"} <= x.keys()
        assert x["meets_tutorial_task"] == (x["val_accuracy"] >= 0.8 and x["method"] != "scratch")
    head = r["results"][1]
    assert head["cv_folds"] == 3 and 0 <= head["cv_accuracy_std"] <= head["cv_accuracy_mean"] <= 1
    assert len(r["results"][2]["history"]) == 2 and len(r["results"][0]["history"]) == 1
    cfg = r["config"]
    assert cfg["out"] == str(out) and cfg["cv"] == 3 and cfg["backbones"] == ["mobilenet_v2"]
    assert cfg["finetune"]["epochs"] == 1 and cfg["finetune"]["lr_backbone"] < cfg["finetune"]["lr_head"]
    assert r["dataset"]["images_per_class"] == {c: 4 for c in r["dataset"]["classes"]}
    b = r["backbones"]["mobilenet_v2"]
    assert len(b["weights_sha256"]) == 64 and b["preprocessing"]["crop"] == 224
    assert set(r["timings"]["one_time"]["mobilenet_v2"]) == {"extract_seconds", "prepare_seconds"}
    assert sum(map(sum, r["best"]["confusion"])) == r["dataset"]["n_val"]
    # the markdown table shows exactly the JSON's numbers
    rows = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ") and
            not line.startswith("| method") and not line.startswith("| ---")]
    assert len(rows) == 3
    for line, x in zip(rows, r["results"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:2] == [x["method"], x["backbone"]]
        assert float(cells[2]) == pytest.approx(x["train_accuracy"], abs=5e-4)
        assert float(cells[3].split()[0]) == pytest.approx(x["val_accuracy"], abs=5e-4)
        seconds = float(cells[4].removesuffix(" s"))
        assert seconds == pytest.approx(x["train_seconds"], abs=0.0051)  # 2 decimals + float slack
        if x["method"] == "head":
            mean, std = map(float, re.findall(r"CV ([\d.]+) ± ([\d.]+)", cells[3])[0])
            # 3 decimals in the table: a half-way value like 0.0625 may round either way
            assert (mean, std) == pytest.approx((x["cv_accuracy_mean"], x["cv_accuracy_std"]), abs=5e-4 + 1e-9)
    assert re.search(r"Fine-tuning mobilenet_v2 (helped|did not help)", (out / "report.md").read_text())


def test_every_rows_model_is_saved_and_linked(quick_run):
    r, out, _, _ = quick_run
    models = out / "models"
    assert {x["method"]: x["model_path"] for x in r["results"]} == {
        "scratch": str(models / "mobilenet_v2-scratch"), "head": str(models / "mobilenet_v2-logistic"),
        "finetune": str(models / "mobilenet_v2-finetuned")}
    best = next(x for x in r["results"] if (x["method"], x["backbone"]) == (r["best"]["method"], r["best"]["backbone"]))
    assert r["best"]["model_path"] == best["model_path"]
    md = (out / "report.md").read_text()
    rel = os.path.relpath(best["model_path"], out)
    assert f"saved as [{rel}]({rel})" in md and str(out) not in md  # relative links: the report dir can move
    assert all(f"({os.path.relpath(x['model_path'], out)})" in md for x in r["results"])
    kinds = {x["method"]: json.loads((Path(x["model_path"]) / "bundle.json").read_text()) for x in r["results"]}
    assert (kinds["head"]["finetuned"], kinds["scratch"]["finetuned"], kinds["finetune"]["finetuned"]) == (
        False, True, True)  # scratch: its whole random-init-trained backbone travels in the bundle
    assert kinds["scratch"]["weights_sha256"] == "random-init"


def test_predict_loads_every_saved_model(quick_run):
    """The best row's bundle through the CLI; each kind in-process. The head bundle must be the head row's head:
    on all 20 images it gets right what the row's train and val accuracies say (one image of float slack)."""
    from featpipe.predict import PredictConfig, predict

    r, _, data, _ = quick_run
    p = run_json("predict", r["best"]["model_path"], data, "--top-k", "1")
    assert len(p["predictions"]) == 20 and not p["skipped"]
    for x in r["results"]:
        got = predict(PredictConfig(Path(x["model_path"]), [data], top_k=1))["predictions"]
        right = sum(g["top"][0]["class"] == Path(g["path"]).parent.name for g in got)
        assert len(got) == 20, x["method"]
        if x["method"] == "head":
            expected = x["train_accuracy"] * x["n_train"] + x["val_accuracy"] * x["n_val"]
            assert abs(right - expected) <= 1, (right, expected)


def test_the_head_bundle_is_the_one_fit_head_makes(quick_run, tmp_path):
    """Same data, split, seed and cache: fit-head's bundle holds the same head, classes and provenance."""
    r, out, data, _ = quick_run
    run_cli("fit-head", data, "--cache-dir", out.parent / "cache", "--out", tmp_path / "fh", check=True)
    ours, theirs = (json.loads((d / "bundle.json").read_text()) for d in (out / "models" / "mobilenet_v2-logistic",
                                                                          tmp_path / "fh"))
    for key in ("backbone", "weights_sha256", "preprocessing", "classes", "head", "data", "files", "finetuned"):
        assert ours[key] == theirs[key], key
    assert ours["metrics"].keys() >= {"train_accuracy", "val_accuracy", "n_train", "n_val", "fit_seconds", "seed"}


def test_bonus_resnet50_stops_at_once_offline(tmp_path):
    t0 = time.perf_counter()
    proc = run_cli("experiment", "--config", REPO / "pipelines" / "bonus-resnet50.toml", "--out", tmp_path / "rep",
                   "--cache-dir", tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "'resnet50'" in proc.stderr and "offline" in proc.stderr
    assert not (tmp_path / "rep").exists() and not (tmp_path / "cache").exists()  # no work done first
    assert time.perf_counter() - t0 < 120  # imports only (generous: CI cores are shared)


def test_shipped_configs_parse():
    from featpipe.experiment_config import ExperimentConfig, read_config

    for path in sorted((REPO / "pipelines").glob("*.toml")):
        cfg = ExperimentConfig(**read_config(path))
        assert cfg.backbones and cfg.methods, path
    tutorial = ExperimentConfig(**read_config(REPO / "pipelines" / "tutorial.toml"))
    assert tutorial.backbones == ["mobilenet_v2"] and tutorial.val_fraction == 0.2
    assert tutorial.train_config("finetune", "mobilenet_v2").lr_backbone == 1e-5


def test_bad_input_is_one_line_exit_2(tmp_path):
    proc = run_cli("experiment", "--methods", "head,magic", "--out", tmp_path / "rep", "--json")
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1 and "--methods" in proc.stderr


@pytest.mark.parametrize("kw, config, match", [
    ({"backbones": ["mobilenet_v9"]}, None, "unknown backbone"),
    ({"backbones": []}, None, "--backbones"),
    ({}, "[finetune]\nlearning_rate = 1\n", "unknown key"),
    ({}, "[finetune]\nepochs = 0\n", "--epochs"),
    ({}, "[experiment]\nbackbones = [\n", "cannot read config"),
    ({}, "[experment]\nseed = 1\n", "unknown key"),
    ({"data_dir": Path("/nonexistent/data")}, None, "data directory not found"),
    ({"backbones": ["mobilenet_v2", "mobilenet_v2"]}, None, "names a backbone twice"),
    ({"methods": ["head"], "val_fraction": 0.0}, None, r"--val-fraction must be in \(0, 1\): the methods"),
    ({}, "[experiment]\nhead = 'svm'\n", "--head must be one of"),
    ({}, "[experiment]\ncv = 1\n", "cv must be at least 2"),
    ({"backbones": ["auto"], "methods": ["head"]}, "[experiment]\nhead = 'mlp'\n", "auto chooses its feature set"),
    # a config file's values arrive untyped: each must fail as one line, not a traceback mid-run
    ({}, "[experiment]\nval_fraction = 'x'\n", r"\[experiment\] val_fraction must be a number \(got 'x'\)"),
    ({}, "[experiment]\nseed = 'abc'\n", "seed must be an integer"),
    ({}, "[experiment]\nseed = -1\n", r"seed must be in \[0, 2\*\*32\) \(got -1\)"),
    ({}, "[experiment]\ncv = true\n", "cv must be an integer"),
    ({}, "[experiment]\nout = 5\n", r"out must be a path \(string\)"),
    ({}, "[experiment]\nbackbones = 'mobilenet_v2'\n", "backbones must be a list of strings"),
    ({}, "[finetune]\nepochs = 1.5\n", r"\[finetune\] epochs must be an integer"),
    ({}, "[scratch]\nepochs = '1'\n", r"\[scratch\] epochs must be an integer"),
    ({}, "[finetune]\nmin_scale = 2.0\n", r"min_scale must be in \(0, 1\]"),
    ({}, "[finetune]\nweight_decay = -1\n", "weight_decay must be at least 0"),
])
def test_bad_settings_are_user_errors(kw, config, match, tmp_path):
    """In-process (the CLI's UserError -> one line, exit 2 is checked above): no import cost per case."""
    from featpipe.errors import UserError
    from featpipe.experiment import run
    from featpipe.experiment_config import ExperimentConfig, read_config

    with pytest.raises(UserError, match=match):
        if config is not None:
            (tmp_path / "bad.toml").write_text(config)
            kw = read_config(tmp_path / "bad.toml") | kw
        run(ExperimentConfig(**kw, out=tmp_path / "rep", cache_dir=tmp_path / "cache"))
    assert not (tmp_path / "rep").exists()


def test_auto_expands_to_the_offline_backbones_once_and_adds_a_head_row_only_with_head():
    from featpipe import registry
    from featpipe.experiment_config import ExperimentConfig, plan

    offline = [s.name for s in registry.offline_specs()]
    specs, parts = plan(ExperimentConfig(backbones=["efficientnet_lite0", "auto"], methods=["head"]))
    assert [s.name for s in specs] == ["efficientnet_lite0"] + [n for n in offline if n != "efficientnet_lite0"]
    assert parts == (*offline, *(n + ":flip" for n in offline))
    specs, parts = plan(ExperimentConfig(backbones=["auto"], methods=["scratch"]))
    assert [s.name for s in specs] == offline and parts is None  # no head row to choose for


def test_help_shows_the_defaults():
    """Square brackets in help strings are rich markup: a hand-written "[default: ...]" vanished from --help."""
    out = " ".join(run_cli("experiment", "--help", check=True).stdout.split())
    for default in ("mobilenet_v2,efficientnet_lite0", "reports/experiment", "finetune and scratch sections"):
        assert default in out


def test_a_report_dir_holding_another_data_dirs_models_is_refused_before_any_work(tmp_path, small_data):
    from featpipe.errors import UserError
    from featpipe.experiment import run
    from featpipe.experiment_config import ExperimentConfig

    (tmp_path / "rep" / "models" / "m").mkdir(parents=True)
    (tmp_path / "rep" / "models" / "m" / "bundle.json").write_text('{"data": {"dir": "/elsewhere"}}')
    with pytest.raises(UserError, match=f"rep holds models trained on /elsewhere, not "
                                        f"{re.escape(os.path.realpath(small_data))}: pass another --out"):
        run(ExperimentConfig(data_dir=small_data, methods=["head"], out=tmp_path / "rep", cache_dir=tmp_path / "c"))
    assert not (tmp_path / "c").exists()


def test_a_missing_or_undecodable_config_file_is_a_user_error(tmp_path):
    from featpipe.errors import UserError
    from featpipe.experiment_config import read_config

    with pytest.raises(UserError, match="config file not found"):
        read_config(Path("/nonexistent.toml"))
    (tmp_path / "b.toml").write_bytes(b"\xff\xfe")  # not UTF-8, which TOML must be
    with pytest.raises(UserError, match="cannot read config .*b.toml: 'utf-8' codec can't decode"):
        read_config(tmp_path / "b.toml")


def test_val_dir_and_test_dir_reach_every_row_and_choose_nothing(shipped, tmp_path):
    """--test-dir adds a test column and changes no choice: each row's C, epochs and val scores are those of the
    same experiment without it (its photos sit under wrong class folders, so a leak would show)."""
    train, val, test = held_out_folders(shipped, tmp_path / "data")
    config = tmp_path / "quick.toml"
    config.write_text("[finetune]\nepochs = 2\nunfreeze_blocks = 2\n[scratch]\nepochs = 1\n")
    args = ["experiment", train, "--val-dir", val, "--backbones", "mobilenet_v2", "--config", config,
            "--cache-dir", tmp_path / "cache"]
    plain = run_json(*args, "--out", tmp_path / "plain")
    tested = run_json(*args, "--test-dir", test, "--out", tmp_path / "tested")
    assert tested["dataset"]["validation"] == f"--val-dir {val}" and tested["dataset"]["n_val"] == 10
    for p, t in zip(plain["results"], tested["results"]):
        assert (p["method"], p["val_accuracy"], p["hyperparameters"]) == (t["method"], t["val_accuracy"],
                                                                          t["hyperparameters"])
        assert [h["val_accuracy"] for h in p["history"]] == [h["val_accuracy"] for h in t["history"]]
        assert "test_accuracy" not in p and t["n_test"] == 10 and t["test_accuracy"] <= 0.3, t
    md = (tmp_path / "tested" / "report.md").read_text()
    assert "| test acc |" in md and f"--val-dir {val}" in md
