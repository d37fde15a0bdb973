"""Model bundles and `featpipe predict`: round trip against the in-process head, tampering, fine-tuned hook."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from featpipe import bundle as B
from featpipe.errors import UserError
from featpipe.extract import ExtractConfig
from featpipe.features import load_features
from featpipe.predict import PredictConfig, predict
from tests.conftest import run_cli, run_json


@pytest.fixture(scope="module")
def model(warm_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "logistic"
    run_json("fit-head", "--cache-dir", warm_cache, "--out", out)
    return out


@pytest.fixture(scope="module")
def sample(shipped) -> list[Path]:
    """Two photos of each class (the first and last by name)."""
    return [p for d in sorted(x for x in shipped.iterdir() if x.is_dir()) for p in sorted(d.iterdir())[::-1][:2]]


def _in_process_top1(model: Path, warm_cache: Path, paths: list[Path]) -> list[str]:
    f = load_features(ExtractConfig(cache_dir=warm_cache), progress=False)
    b = B.load(model)
    rows = [f.paths.index(str(p)) for p in paths]
    return [b.classes[i] for i in b.head.predict_proba(f.X[rows]).argmax(1)]


def test_predict_cli_matches_in_process_head(model, warm_cache, sample, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(sample[0].read_bytes()[:200])  # a truncated JPEG beside the good ones
    r = run_json("predict", model, *sample, bad, "--top-k", "2")
    assert r["model"] == str(model)
    assert [p["path"] for p in r["predictions"]] == [str(p) for p in sample]
    assert [s["path"] for s in r["skipped"]] == [str(bad)] and r["skipped"][0]["reason"]
    for p in r["predictions"]:
        assert len(p["top"]) == 2 and p["top"][0]["probability"] >= p["top"][1]["probability"]
        assert set(p["top"][0]) == {"class", "probability"}
    assert [p["top"][0]["class"] for p in r["predictions"]] == _in_process_top1(model, warm_cache, sample)


def _tampered(model: Path, tmp_path: Path) -> Path:
    copy = Path(shutil.copytree(model, tmp_path / "tampered"))
    data = bytearray((copy / B.HEAD_FILE).read_bytes())
    data[-5] ^= 0x01
    (copy / B.HEAD_FILE).write_bytes(bytes(data))
    return copy


def test_tampered_bundle_is_exit_2_one_line(model, sample, tmp_path):
    proc = run_cli("predict", _tampered(model, tmp_path), sample[0])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "head.safetensors is corrupt or was modified" in proc.stderr


@pytest.mark.parametrize("damage, says", [
    ("truncate", "corrupt or was modified"), ("drop_manifest", "not a model bundle"), ("bad_json", "cannot read"),
    ("drop_file_entry", "incomplete"), ("head_null", "malformed field"), ("classes_twice", "distinct names"),
    ("classes_string", "distinct names"), ("finetuned_without_backbone", "disagree")])
def test_damaged_bundles_are_user_errors(model, tmp_path, damage, says):
    copy = Path(shutil.copytree(model, tmp_path / damage))
    manifest = copy / B.MANIFEST
    if damage == "truncate":
        (copy / B.HEAD_FILE).write_bytes((copy / B.HEAD_FILE).read_bytes()[:100])
    elif damage == "drop_manifest":
        manifest.unlink()
    elif damage == "bad_json":
        manifest.write_text("{not json")
    else:
        m = json.loads(manifest.read_text())
        edit = {"drop_file_entry": {"files": {}}, "head_null": {"head": None}, "classes_string": {"classes": "animals"},
                "classes_twice": {"classes": [m["classes"][0]] + m["classes"][:-1]},
                "finetuned_without_backbone": {"finetuned": True}}
        manifest.write_text(json.dumps(m | edit[damage]))
    with pytest.raises(UserError, match=says):
        B.load(copy)


def test_finetuned_bundle_loads_backbone_safetensors(model, sample, tmp_path):
    """The fine-tune hook: same weights stored as backbone.safetensors give the same predictions."""
    from featpipe import registry
    from featpipe.backbone import load

    b = B.load(model)
    state = load(registry.resolve(b.backbone)).model.state_dict()
    ft = B.save(b, tmp_path / "ft", backbone_state=state)
    assert json.loads((ft / B.MANIFEST).read_text())["finetuned"] is True
    assert B.load(ft).finetuned
    cfg = PredictConfig(model, sample[:3], top_k=5, device="cpu", cache_dir=tmp_path / "c")
    plain, tuned = predict(cfg), predict(PredictConfig(ft, cfg.paths, 5, "cpu", cache_dir=tmp_path / "c"))
    for p, q in zip(plain["predictions"], tuned["predictions"]):
        np.testing.assert_allclose([t["probability"] for t in p["top"]], [t["probability"] for t in q["top"]],
                                   atol=1e-5)


def test_predict_missing_path_and_bad_model(model, tmp_path):
    with pytest.raises(UserError, match="no such file"):
        predict(PredictConfig(model, [tmp_path / "nope.jpg"]))
    with pytest.raises(UserError, match="not a model bundle"):
        predict(PredictConfig(tmp_path, [tmp_path]))


def test_plain_text_stdout_holds_only_predictions(model, sample, tmp_path):
    """Skipped files and the summary go to stderr, so `predict ... > out.txt` keeps one line per prediction."""
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    proc = run_cli("predict", model, *sample, bad, "--top-k", "1", check=True)
    assert [line.partition(": ")[0] for line in proc.stdout.splitlines()] == [str(p) for p in sample]
    assert f"skipped {bad}: not an image" in proc.stderr and "skipped" not in proc.stdout
    assert re.search(rf"^predicted {len(sample)} images, skipped 1 in [\d.]+ s", proc.stderr, re.M), proc.stderr
    assert all(line.strip() for line in proc.stderr.splitlines()), proc.stderr  # no blank line off a terminal


def test_json_keeps_stdout_to_one_object_and_summarises_on_stderr(model, sample):
    proc = run_cli("predict", model, sample[0], "--json", check=True)
    assert len(json.loads(proc.stdout)["predictions"]) == 1
    assert re.search(r"^predicted 1 image, skipped 0 in [\d.]+ s", proc.stderr, re.M), proc.stderr


def test_progress_bar_on_a_terminal(model, sample):
    """rich draws the bar when stderr is a terminal (TTY_COMPATIBLE=1 says so for a pipe): label and final count."""
    proc = run_cli("predict", model, *sample, env={"TTY_COMPATIBLE": "1"}, check=True)
    assert f"predict {model.name}" in proc.stderr and f"{len(sample)}/{len(sample)}" in proc.stderr
    assert len(proc.stdout.splitlines()) == len(sample) and "\x1b" not in proc.stdout


def test_no_images_found_is_one_line_exit_2(model, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".DS_Store").write_bytes(b"\0")  # hidden entries are not searched
    proc = run_cli("predict", model, tmp_path / "empty", tmp_path / "hidden")
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1
    assert f"no images found in {tmp_path / 'empty'}, {tmp_path / 'hidden'}" in proc.stderr


@pytest.fixture(scope="module")
def finetuned(model, tmp_path_factory) -> Path:
    """A fine-tuned bundle: the pretrained weights stored as the bundle's own backbone.safetensors."""
    from featpipe import registry
    from featpipe.backbone import load

    b = B.load(model)
    return B.save(b, tmp_path_factory.mktemp("ft") / "ft", backbone_state=load(registry.resolve(b.backbone))
                  .model.state_dict())


def test_weights_with_a_finetuned_bundle_is_refused(finetuned, sample, tmp_path):
    """--weights would be ignored (backbone.safetensors is the backbone): predict, evaluate and export say so rather
    than run."""
    from featpipe import registry

    ckpt = registry.resolve("mobilenet_v2").offline_path()  # a real, fitting checkpoint: only the bundle is wrong
    for args in (("predict", finetuned, sample[0]), ("evaluate", finetuned, sample[0].parent.parent),
                 ("export", finetuned, "--out", tmp_path / "m.onnx")):
        proc = run_cli(*args, "--weights", ckpt)
        assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
        assert "fine-tuned" in proc.stderr and "drop --weights" in proc.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_weights_that_are_not_a_checkpoint_say_so(model, sample, tmp_path):
    """A text file as --weights: not "trained on other weights (sha256 …)", which hides what is wrong."""
    text = tmp_path / "weights.txt"
    text.write_text("ignore me\n")
    proc = run_cli("predict", model, sample[0], "--weights", text)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert f"cannot read weights {text}: it is neither a PyTorch checkpoint" in proc.stderr


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_out_file_holds_what_the_listing_says(model, sample, tmp_path, suffix):
    """--out writes every prediction batch by batch: the same files, top class and probabilities as the listing."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    files = sample + [tmp_path / "not-an-image.jpg"]
    files[-1].write_bytes(b"nope")
    listed = predict(PredictConfig(model=model, paths=files, top_k=5))
    r = predict(PredictConfig(model=model, paths=files, top_k=5, out=tmp_path / f"p{suffix}"))
    assert r["predicted"] == listed["predicted"] == len(sample) and r["skipped"] == listed["skipped"]
    table = (pq.read_table if suffix == ".parquet" else pcsv.read_csv)(tmp_path / f"p{suffix}").to_pydict()
    assert table["path"] == [p["path"] for p in listed["predictions"]]
    assert table["predicted"] == [p["top"][0]["class"] for p in listed["predictions"]]
    classes = B.load(model).classes
    for k, p in enumerate(listed["predictions"]):
        assert {t["class"]: t["probability"] for t in p["top"]} == pytest.approx(
            {c: table[f"p:{c}"][k] for c in classes}, abs=1e-6)
    with pytest.raises(UserError, match="must end in .csv or .parquet"):
        predict(PredictConfig(model=model, paths=files, out=tmp_path / "p.txt"))


def test_predict_embeds_through_the_cache_and_matches_the_direct_path(model, sample, tmp_path):
    """A head-only bundle's images go through extract's cache: a second call computes nothing, and the
    probabilities equal the per-batch Pillow path's (same backbone, decoder and precision)."""
    from featpipe.extract import extract
    from featpipe.predict import probabilities

    cfg = PredictConfig(model=model, paths=sample, top_k=5, cache_dir=tmp_path / "c")
    first = predict(cfg)
    again = extract(ExtractConfig(files=sample, cache_dir=tmp_path / "c"))
    assert (again.computed, again.reused) == (0, len(sample))
    assert predict(cfg) == first
    direct, ok, _ = probabilities(B.load(model), sample, "auto")
    assert [str(p) for p in ok] == [p["path"] for p in first["predictions"]]
    classes = B.load(model).classes
    cached = np.array([[{t["class"]: t["probability"] for t in p["top"]}[c] for c in classes]
                       for p in first["predictions"]])
    assert np.abs(cached - direct).max() < 1e-3


def test_a_finetuned_bundle_embeds_through_its_own_cache_rows(finetuned, sample, tmp_path):
    """Its backbone.safetensors keys its own rows (its sha256, not the pretrained weights'): a second call computes
    nothing, and the probabilities equal the direct per-batch path's."""
    from featpipe.extract import extract
    from featpipe.predict import probabilities

    cfg = PredictConfig(model=finetuned, paths=sample, top_k=5, cache_dir=tmp_path / "c")
    first = predict(cfg)
    own = ExtractConfig(files=sample, cache_dir=tmp_path / "c", weights=finetuned / B.BACKBONE_FILE)
    again = extract(own)
    assert (again.computed, again.reused) == (0, len(sample))
    assert extract(ExtractConfig(files=sample, cache_dir=tmp_path / "c")).computed == len(sample)  # other rows
    assert predict(cfg) == first
    bundle = B.load(finetuned)
    direct, ok, _ = probabilities(bundle, sample, "auto")
    cached = np.array([[{t["class"]: t["probability"] for t in p["top"]}[c] for c in bundle.classes]
                       for p in first["predictions"]])
    assert [str(p) for p in ok] == [p["path"] for p in first["predictions"]] and np.abs(cached - direct).max() < 1e-3


def test_an_empty_folder_among_the_paths_is_said(sample, tmp_path, capsys):
    from featpipe.predict import collect

    (tmp_path / "empty").mkdir()
    assert collect([sample[0], tmp_path / "empty"]) == [sample[0]]
    assert f"{tmp_path / 'empty'} holds no files" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["under a file", "read-only folder"])
def test_predict_embeds_without_the_cache_where_it_cannot_be_written(model, sample, tmp_path, capsys, where):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "ro").mkdir(mode=0o555)  # read-only to root too: featpipe takes the mode as meant
    cache_dir = tmp_path / "afile" / "cache" if where == "under a file" else tmp_path / "ro"
    r = predict(PredictConfig(model=model, paths=sample[:2], top_k=1, cache_dir=cache_dir))
    assert r["predicted"] == 2 and "not writable: embedding without the cache" in capsys.readouterr().err
    cached = predict(PredictConfig(model=model, paths=sample[:2], top_k=1, cache_dir=tmp_path / "c"))
    assert [p["top"][0]["class"] for p in r["predictions"]] == [p["top"][0]["class"] for p in cached["predictions"]]
    assert not (tmp_path / "afile").is_dir() and not list((tmp_path / "ro").iterdir())
