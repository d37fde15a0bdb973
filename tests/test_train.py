"""Fine-tune and scratch: freezing rules as units, then short real runs through the CLI (real photos, real weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import held_out_folders, make_subset, run_cli, run_json
from featpipe import registry
from featpipe.backbone import load
from featpipe.errors import UserError
from featpipe.train import Classifier, TrainConfig, freeze_all_but_last, scratch

HISTORY_KEYS = {"epoch", "train_loss", "train_accuracy", "val_accuracy", "seconds"}
RESULT_KEYS = {"method", "backbone", "train_accuracy", "val_accuracy", "train_seconds", "best_epoch", "epochs_run",
               "history", "trainable_params", "total_params", "hyperparameters", "device", "precision", "n_train",
               "n_val", "model_path"}


@pytest.fixture(scope="module")
def finetunable() -> tuple[Classifier, list[nn.Module]]:
    torch.manual_seed(0)
    backbone = load(registry.resolve("mobilenet_v2"), pretrained=False).model
    trainable = freeze_all_but_last(backbone, 2)
    return Classifier(backbone, nn.Linear(1280, 5), trainable), trainable


def test_only_the_last_n_blocks_require_grad(finetunable):
    model, trainable = finetunable
    blocks = model.backbone.blocks()
    assert trainable == blocks[-2:]
    for block in blocks[:-2]:
        assert not any(p.requires_grad for p in block.parameters())
    for block in blocks[-2:]:
        assert all(p.requires_grad for p in block.parameters())
    in_blocks = {id(p) for b in blocks[-2:] for p in b.parameters()}
    outside = [p for p in model.backbone.parameters() if id(p) not in in_blocks]
    assert outside and not any(p.requires_grad for p in outside)
    assert all(p.requires_grad for p in model.head.parameters())


def test_train_mode_keeps_frozen_parts_and_batchnorm_in_eval(finetunable):
    model, trainable = finetunable
    model.train()
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    assert model.head.training and all(b.training for b in trainable)
    assert not model.backbone.blocks()[0].training
    before = [m.running_mean.clone() for m in bns]
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 96, 96, 3), dtype=torch.uint8))
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns)), "a BatchNorm updated its statistics"
    model.eval()
    assert not model.head.training


def test_unfreezing_more_blocks_than_exist_is_a_user_error():
    backbone = load(registry.resolve("mobilenet_v2"), pretrained=False).model
    with pytest.raises(UserError, match="only 19 blocks"):
        freeze_all_but_last(backbone, 99)


@pytest.mark.parametrize("head", ["logistic", "mlp"])
def test_finetune_end_to_end_saves_a_bundle_predict_loads(small_data, tmp_path, head):
    out = tmp_path / "ft"
    r = run_json("finetune", small_data, "--cache-dir", tmp_path / "cache", "--epochs", "1", "--unfreeze-blocks",
                 "2", "--head", head, "--out", out)
    assert r["hyperparameters"]["warm_start"]["head"] == head
    assert RESULT_KEYS <= r.keys() and r["method"] == "finetune"
    assert [h["epoch"] for h in r["history"]] == [0, 1]  # 0 = the warm-started head before any fine-tuning
    assert all(HISTORY_KEYS <= h.keys() for h in r["history"])
    assert r["history"][1]["seconds"] > 0 and 0 <= r["history"][1]["train_accuracy"] <= 1
    assert r["val_accuracy"] == max(h["val_accuracy"] for h in r["history"])  # best checkpoint kept
    assert r["n_train"] == 15 and r["n_val"] == 5  # 4 per class, 20%: one per class held out
    assert 0 < r["trainable_params"] < r["total_params"]
    assert r["hyperparameters"]["lr_backbone"] < r["hyperparameters"]["lr_head"]
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["finetuned"] is True and (out / "backbone.safetensors").is_file()
    assert manifest["head"]["kind"] == head
    one = sorted((small_data / "tools").iterdir())[0]
    p = run_json("predict", out, one, "--top-k", "1")
    assert len(p["predictions"]) == 1 and p["predictions"][0]["top"][0]["class"] in manifest["classes"]


def test_scratch_end_to_end_saves_a_bundle_predict_loads(small_data, tmp_path):
    (small_data / "tools" / "notes.txt").write_text("not an image")  # skipped and listed, never fatal
    out = tmp_path / "sc"
    r = run_json("scratch", small_data, "--epochs", "1", "--seed", "3", "--out", out)
    assert RESULT_KEYS <= r.keys() and r["method"] == "scratch" and r["model_path"] == str(out)
    assert [h["epoch"] for h in r["history"]] == [1] and HISTORY_KEYS <= r["history"][0].keys()
    assert r["trainable_params"] == r["total_params"]
    assert r["n_train"] + r["n_val"] == 20
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["finetuned"] is True and (out / "backbone.safetensors").is_file()
    assert manifest["weights_sha256"] == "random-init" and manifest["data"]["dir"] == str(small_data)
    p = run_json("predict", out, small_data / "tools", "--top-k", "1")
    assert len(p["predictions"]) == 4 and p["predictions"][0]["top"][0]["class"] in manifest["classes"]


def test_scratch_bundle_predicts_what_the_trained_model_did(small_data, tmp_path):
    """predict on the val images (the same split scan_images makes) gives training's own val predictions: the
    bundle holds every trained weight, BatchNorm statistics included, and the head predict computes."""
    from featpipe.predict import PredictConfig, predict
    from featpipe.train_images import scan_images

    cfg = TrainConfig(data_dir=small_data, epochs=2, val_fraction=0.5, out=tmp_path / "sc")
    res = scratch(cfg, log=lambda s: None)
    images = scan_images(cfg.data_dir, cfg.backbone, cfg.val_fraction, cfg.seed)
    val = [Path(images.paths[i]) for i in images.split.val]
    got = predict(PredictConfig(Path(res.model_path), val, top_k=1))["predictions"]
    same = np.mean([images.classes.index(g["top"][0]["class"]) for g in got] == res.val_pred)
    # training scores its head under bf16 autocast, predict in float32: a barely trained model's near-tied
    # logits may flip one image; an untrained or wrongly assembled bundle agrees at chance (about 1 in 5)
    assert same >= 0.8, same
    assert json.loads((Path(res.model_path) / "bundle.json").read_text())["head"]["params"]["unit_norm"] is False


def test_scratch_refuses_to_replace_a_model_of_other_data_before_any_work(small_data, tmp_path):
    out = tmp_path / "sc"
    out.mkdir()
    (out / "bundle.json").write_text(json.dumps({"data": {"dir": "/elsewhere/photos"}}))
    proc = run_cli("scratch", small_data, "--epochs", "1", "--out", out)
    assert proc.returncode == 2 and "/elsewhere/photos" in proc.stderr and "--force" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # refused up front: no training log before it
    assert json.loads((out / "bundle.json").read_text()) == {"data": {"dir": "/elsewhere/photos"}}


def test_bad_input_is_one_line_exit_2():
    proc = run_cli("finetune", "/nonexistent/data", "--json")
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and proc.stderr.strip().splitlines() == [
        "featpipe: error: data directory not found: /nonexistent/data"]


def test_a_class_with_no_valid_image_is_a_user_error(small_data, tmp_path):
    """Scratch decodes the data dir itself (no cache): the same refusal as extract, before any training."""
    (small_data / "zebras").mkdir()
    (small_data / "zebras" / "z.jpg").write_text("not an image")
    with pytest.raises(UserError, match=r"class folder .*zebras has no valid image$"):
        scratch(TrainConfig(data_dir=small_data, epochs=1, out=tmp_path / "sc"))


def test_one_class_or_a_one_image_class_is_a_user_error(small_data, tmp_path):
    """Before any training; and the advice must be one training accepts (not --val-fraction 0)."""
    for cls in ["animals", "fishes", "monuments"]:
        shutil.rmtree(small_data / cls)
    for f in sorted((small_data / "tools").iterdir())[1:]:
        f.unlink()
    with pytest.raises(UserError, match="'tools' has 1 image.*training needs at least 2 per class$"):
        scratch(TrainConfig(data_dir=small_data, epochs=1, out=tmp_path / "sc"))
    shutil.rmtree(small_data / "tools")
    with pytest.raises(UserError, match="at least 2 classes with images, found 1: renewable_energy$"):
        scratch(TrainConfig(data_dir=small_data, epochs=1, out=tmp_path / "sc"))


@pytest.mark.parametrize("kw, match", [
    ({"val_fraction": 1.5}, "--val-fraction"),
    ({"val_fraction": 0.0}, "early stopping needs a validation share"),
    ({"epochs": 0}, "--epochs"),
    ({"device": "tpu"}, "--device"),
    ({"backbone": "mobilenet_v9"}, "unknown backbone"),
])
def test_bad_settings_are_user_errors(kw, match):
    """In-process (the CLI turns any UserError into one line + exit 2, checked above): no import cost per case."""
    with pytest.raises(UserError, match=match):
        scratch(TrainConfig(**kw))


def test_a_killed_run_resumes_after_its_last_epoch_and_ends_as_an_uninterrupted_run(small_data, tmp_path):
    """SIGKILL once the first epoch's checkpoint is written; --resume then trains the rest, drawing the same batches
    and crops (torch's random state is in the checkpoint): the same history and model as a run never killed."""
    import signal
    import subprocess
    import sys
    import time

    args = ["scratch", str(small_data), "--epochs", "3", "--seed", "2"]
    whole = run_json(*args, "--out", tmp_path / "whole")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "featpipe", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not (killed / "checkpoint.pt").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before its first checkpoint: nothing was tested"
    assert not (killed / "bundle.json").exists()
    proc = run_cli(*args, "--out", killed, "--resume", "--json", check=True)
    resumed = json.loads(proc.stdout)
    assert "resumed after epoch" in proc.stderr, proc.stderr
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in whole["history"]]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in resumed["history"]] == strip
    assert (resumed["val_accuracy"], resumed["train_accuracy"]) == (whole["val_accuracy"], whole["train_accuracy"])
    assert not (killed / "checkpoint.pt").exists() and (killed / "bundle.json").exists()
    from safetensors.numpy import load_file

    a, b = load_file(killed / "backbone.safetensors"), load_file(tmp_path / "whole" / "backbone.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)



def test_finetune_val_dir_validates_and_the_test_dir_chooses_nothing(shipped, tmp_path):
    """The same run with and without --test-dir trains to identical weights (a test set used for early stopping
    or the warm-start head would change them), and only the run given one reports test_accuracy."""
    from safetensors.numpy import load_file

    train, val, test = held_out_folders(shipped, tmp_path / "data")
    args = ["finetune", train, "--val-dir", val, "--epochs", "2", "--cache-dir", tmp_path / "cache"]
    plain = run_json(*args, "--out", tmp_path / "plain")
    tested = run_json(*args, "--test-dir", test, "--out", tmp_path / "tested")
    assert plain["validation"] == tested["validation"] == f"--val-dir {val}"
    assert (plain["n_train"], plain["n_val"]) == (30, 10) and "test_accuracy" not in plain
    assert tested["n_test"] == 10 and tested["test_in_train"] == 0 and tested["test_accuracy"] <= 0.3
    strip = [[{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]] for r in (plain, tested)]
    assert strip[0] == strip[1] and plain["best_epoch"] == tested["best_epoch"]
    a, b = (load_file(tmp_path / d / "backbone.safetensors") for d in ("plain", "tested"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "tested" / "bundle.json").read_text())["metrics"]
    assert meta["test_accuracy"] == tested["test_accuracy"]


def test_a_tie_on_validation_keeps_the_earlier_epoch(shipped, tmp_path):
    """15 validation images: accuracies such as 14/15 are rounded in the history; the best epoch is the first of
    the highest, as rounded (a later epoch that only ties must not replace it)."""
    data = make_subset(shipped, tmp_path / "train", 8)
    val = tmp_path / "val"
    for cls in sorted(p for p in shipped.iterdir() if p.is_dir()):
        (val / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[8:11]:
            shutil.copy(f, val / cls.name / f.name)
    r = run_json("finetune", data, "--val-dir", val, "--epochs", "2", "--unfreeze-blocks", "1",
                 "--cache-dir", tmp_path / "c", "--out", tmp_path / "ft")
    top = max(h["val_accuracy"] for h in r["history"])
    assert r["n_val"] == 15 and r["best_epoch"] == min(h["epoch"] for h in r["history"] if h["val_accuracy"] == top)
