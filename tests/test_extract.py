"""featpipe extract end to end: real photos, real weights, real HDF5, the CLI as a subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from featpipe import fileindex
from featpipe.engine import decoders_version
from tests.conftest import journalled_bytes, make_subset, run_cli, run_json
from tests.faults import faultkit as fk

KEYS = {"images", "computed", "reused", "skipped", "seconds", "images_per_sec", "cache_file", "backbone", "dim",
        "decoder", "device", "precision"}


def read_h5(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {h.decode(): e for h, e in zip(f["sha256"][:], f["embeddings"][:])}


def test_cold_then_warm_run_reuses_everything(tmp_path, small_data):
    cold = run_json("extract", small_data, "--cache-dir", tmp_path / "c")
    assert KEYS <= cold.keys()
    assert (cold["images"], cold["computed"], cold["reused"], cold["skipped"]) == (20, 20, 0, [])
    assert (cold["backbone"], cold["dim"], cold["device"], cold["decoder"]) == ("mobilenet_v2", 1280, "cpu", "pil")
    warm = run_json("extract", small_data, "--cache-dir", tmp_path / "c")
    assert (warm["computed"], warm["reused"], warm["cache_file"]) == (0, 20, cold["cache_file"])
    with h5py.File(cold["cache_file"], "r") as f:  # documented format, plain h5py
        assert f["embeddings"].shape == (20, 1280) and f["sha256"].shape == (20,)
        assert f.attrs["backbone"] == "mobilenet_v2" and f.attrs["weights_sha256"].startswith("b0353104")
        assert sorted(set(f["label"].asstr()[:])) == sorted(p.name for p in small_data.iterdir())


def test_changed_file_recomputes_exactly_one_and_moves_are_reused(tmp_path, small_data):
    run_json("extract", small_data, "--cache-dir", tmp_path / "c")
    victim = sorted((small_data / "tools").iterdir())[0]
    Image.open(victim).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(victim, "JPEG", quality=90)
    moved = sorted((small_data / "fishes").iterdir())[0]
    moved.rename(small_data / "animals" / "renamed.jpg")
    res = run_json("extract", small_data, "--cache-dir", tmp_path / "c")
    assert (res["computed"], res["reused"]) == (1, 19)
    with h5py.File(res["cache_file"], "r") as f:
        paths = dict(zip(f["sha256"].asstr()[:], f["path"].asstr()[:]))
    assert paths[fk.sha256_of(small_data / "animals" / "renamed.jpg")] == str(moved)  # shards are immutable
    assert len(paths) == 21  # the old version of the changed file stays cached (content-addressed)


def test_unchanged_files_are_not_read_again_and_any_write_is_seen(tmp_path, small_data):
    """The file index (featpipe/fileindex.py) spares a warm run reading and hashing files, and never hides a change:
    not for files written just now, not for a rewrite that puts the size and mtime back."""
    victim = sorted((small_data / "tools").iterdir())[0]
    Image.open(victim).save(victim, "JPEG", quality=90)  # Pillow's JPEG: a JFIF header with a density field
    run_json("extract", small_data, "--cache-dir", tmp_path / "c")
    fresh = run_json("extract", small_data, "--cache-dir", tmp_path / "c")
    assert fresh["reused"] == 20 and "read" in fresh["stage_seconds"]  # ctimes too recent to trust yet
    time.sleep(fileindex.RACY_SECONDS + 0.2)
    run_json("extract", small_data, "--cache-dir", tmp_path / "c")  # now the files are recorded
    warm = run_json("extract", small_data, "--cache-dir", tmp_path / "c")
    assert warm["reused"] == 20 and "read" not in warm["stage_seconds"] and "hash" not in warm["stage_seconds"]

    st, data = victim.stat(), bytearray(victim.read_bytes())
    assert data[6:11] == b"JFIF\0"
    data[15] ^= 1  # X density: other bytes, the same pixels, the same size
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (victim.stat().st_size, victim.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    res = run_json("extract", small_data, "--cache-dir", tmp_path / "c")
    assert (res["computed"], res["reused"]) == (1, 19)


def test_an_unchanged_file_that_failed_to_decode_is_not_decoded_again(tmp_path, small_data):
    """A truncated JPEG passes the header probe and fails in the decoder: a warm run must report it without
    reading it or loading the model; rewritten with good bytes, it is embedded."""
    victim = small_data / "tools" / "cut.jpg"
    good = sorted((small_data / "tools").iterdir())[0]
    victim.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    time.sleep(fileindex.RACY_SECONDS + 0.2)  # old enough to be recorded
    cold = run_json("extract", small_data, "--cache-dir", tmp_path / "c")
    assert [s["reason"][:14] for s in cold["skipped"]] == ["decode failed:"]
    warm = run_json("extract", small_data, "--cache-dir", tmp_path / "c")
    assert warm["skipped"] == cold["skipped"] and warm["reused"] == 20
    assert not {"read", "load_model", "decode"} & warm["stage_seconds"].keys(), warm["stage_seconds"]
    Image.open(good).save(victim, "JPEG", quality=80)
    fixed = run_json("extract", small_data, "--cache-dir", tmp_path / "c")
    assert (fixed["computed"], fixed["skipped"]) == (1, [])


def test_bad_files_are_skipped_and_listed(tmp_path, small_data):
    good = sorted((small_data / "tools").iterdir())[0].read_bytes()
    (small_data / "tools" / "empty.jpg").write_bytes(b"")
    (small_data / "tools" / "cut.jpg").write_bytes(good[: len(good) // 2])
    (small_data / "tools" / "notes.txt").write_text("not an image")
    (small_data / "animals" / "cut-copy.jpg").write_bytes(good[: len(good) // 2])  # same bytes: skipped alike
    os.mkfifo(small_data / "tools" / "pipe.jpg")  # opening it would block forever
    (small_data / "fishes" / "zero.jpg").symlink_to("/dev/zero")  # reading it would never end
    (small_data / "loop").symlink_to(small_data / "loop")  # not a class folder, not an error
    res = run_json("extract", small_data, "--cache-dir", tmp_path / "c", "--decoder", "dali", timeout=300)
    reasons = {os.path.basename(s["path"]): s["reason"] for s in res["skipped"]}
    assert set(reasons) == {"empty.jpg", "cut.jpg", "cut-copy.jpg", "notes.txt", "pipe.jpg", "zero.jpg"}, reasons
    assert (res["computed"], res["reused"], res["images"]) == (20, 0, 26)
    assert reasons["empty.jpg"] == "empty file" and reasons["notes.txt"] == "not an image"
    assert reasons["pipe.jpg"] == reasons["zero.jpg"] == "not a regular file"
    assert reasons["cut-copy.jpg"] == reasons["cut.jpg"]


def test_decoders_agree_per_image(tmp_path, shipped):
    """Pillow, DALI's CPU pipeline and torchvision's CPU twin of the nvJPEG path, end to end, fp32."""
    runs = {d: run_json("extract", "--decoder", d, "--precision", "fp32", "--cache-dir", tmp_path / d)
            for d in ("pil", "dali", "torchvision")}
    assert [r["decoder"] for r in runs.values()] == ["pil", "dali-cpu", "torchvision-cpu"]
    by = {d: read_h5(r["cache_file"]) for d, r in runs.items()}
    keys = sorted(by["pil"])
    assert len(keys) == 196 and all(sorted(e) == keys for e in by.values())
    a = np.stack([by["pil"][k] for k in keys])
    for d in ("dali", "torchvision"):
        b = np.stack([by[d][k] for k in keys])
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() >= 0.98, (d, cos.min())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_or_interrupted_mid_run_then_resume(tmp_path, shipped, sig):
    """SIGINT (Ctrl-C) also says so in one line, exit 130 (typer had swallowed it into a silent 130)."""
    cache = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-m", "featpipe", "extract", "--cache-dir", cache, "--batch-size", "8",
                             "--decoder", "pil"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    deadline = time.time() + 120
    journalled = 0
    while time.time() < deadline and proc.poll() is None:  # kill once some batches are journaled
        if (journalled := journalled_bytes(cache)) > 3 * 8 * 1280 * 4:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert journalled, "extract finished before it could be killed"
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and err.strip().splitlines()[-1] == "featpipe: error: interrupted", err
    res = run_json("extract", "--cache-dir", cache, "--decoder", "pil")
    assert 0 < res["reused"] < 196 and res["computed"] + res["reused"] == 196
    assert len(read_h5(res["cache_file"])) == 196 and not list(cache.rglob("journal-*"))


def test_bad_input_is_one_line_exit_2(tmp_path, small_data):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_valid = tmp_path / "novalid"
    (no_valid / "a").mkdir(parents=True)
    (no_valid / "a" / "x.jpg").write_text("text")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    cases = [(["extract", tmp_path / "missing"], "not found"), (["extract", empty], "no files to embed"),
             (["extract", no_valid, "--cache-dir", tmp_path / "c"],
              f"no valid image in {no_valid}; 1 file(s) skipped, e.g. x.jpg: not an image"),
             (["extract", small_data, "-b", "mobilenet_v9"], "did you mean"),
             (["extract", small_data, "--cache-dir", ro], "not writable")]
    for args, msg in cases:
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert msg in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_class_without_a_usable_image_is_noted_by_extract_and_refused_by_training(small_data, tmp_path):
    """Embedding alone keeps the other classes' rows (a note on stderr); a model would silently lack the class."""
    (small_data / "zebras").mkdir()
    (small_data / "zebras" / "z.jpg").write_text("not an image")
    why = f"class folder {small_data / 'zebras'} has no valid image; 1 file(s) skipped, e.g. z.jpg: not an image"
    proc = run_cli("extract", small_data, "--cache-dir", tmp_path / "c", "--json", check=True)
    assert json.loads(proc.stdout)["computed"] == 20 and f"featpipe: {why}\n" in proc.stderr
    fit = run_cli("fit-head", small_data, "--cache-dir", tmp_path / "c", "--out", tmp_path / "m")
    assert fit.returncode == 2 and fit.stderr.strip().splitlines()[-1] == f"featpipe: error: {why}"
    assert not (tmp_path / "m").exists()


def dali_installed() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no `nvidia` namespace package at all
        return False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
@pytest.mark.parametrize("decoder", ["dali", "torchvision"])
def test_gpu_path_agrees_with_cpu_path(tmp_path, shipped, decoder):
    """nvJPEG (DALI mixed, or torchvision's) + CUDA forward vs the CPU twin (Pillow + CPU forward), per image."""
    if decoder == "dali" and not dali_installed():
        pytest.skip("DALI is not installed (the lent GPU machines cannot take its wheel)")
    gpu = run_json("extract", "--device", "cuda", "--decoder", decoder, "--precision", "fp32", "--batch-size", "16",
                   "--cache-dir", tmp_path / "gpu")  # small batches: decoding overlaps many forward passes
    assert (gpu["decoder"], gpu["device"]) == (f"{decoder}-gpu", "cuda:0") and gpu["computed"] == 196
    cpu = run_json("extract", "--device", "cpu", "--decoder", "pil", "--precision", "fp32", "--cache-dir",
                   tmp_path / "cpu")
    a, b = read_h5(gpu["cache_file"]), read_h5(cpu["cache_file"])
    assert a.keys() == b.keys()
    x, y = np.stack([a[k] for k in sorted(a)]), np.stack([b[k] for k in sorted(a)])
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert cos.min() >= 0.98, cos.min()


def test_dali_decoder_takes_batches_longer_than_its_pipeline(shipped):
    """The reader's first batch can be longer than the device's batch size: DALI must run it, not fail over."""
    from featpipe.decode import DaliDecoder, PilDecoder, probe
    from featpipe.registry import resolve

    pre = resolve("mobilenet_v2").preprocessing
    data = [p.read_bytes() for p in sorted(shipped.glob("*/*.jpg"))[:20]]
    probes = [probe(d) for d in data]
    dali = DaliDecoder(pre, 8, None)
    pipe = dali.pipe
    pixels, reasons = dali.decode(data, probes)
    assert dali.pipe is pipe, "a failed DALI run rebuilt the pipeline (and fell back to Pillow)"
    assert reasons == [None] * 20 and pixels.shape == (20, 224, 224, 3)
    again, _ = dali.decode(data[:8], probes[:8])
    np.testing.assert_array_equal(pixels[:8], again)  # chunked output lines up with the inputs
    pil, _ = PilDecoder(pre).decode(data, probes)
    assert np.abs(pixels.astype(int) - pil).mean() < 3


def test_failure_reasons_hold_only_for_the_decoders_that_gave_them(tmp_path):
    """After a featpipe or Pillow upgrade a file that failed is tried again (its hash record stays)."""
    f = tmp_path / "data" / "x.jpg"
    f.parent.mkdir()
    f.write_bytes(b"\xff\xd8 truncated")
    st = f.stat()
    old = fileindex.FileIndex(tmp_path, tmp_path / "data", "featpipe 1, Pillow 1")
    old.record(f, st, "ab" * 32, st.st_ctime_ns + 10**10)
    old.record_failure(f, "decode failed: truncated")
    old.save()
    same = fileindex.FileIndex(tmp_path, tmp_path / "data", "featpipe 1, Pillow 1")
    assert same.unchanged(f, st) == "ab" * 32 and same.failure(f) == "decode failed: truncated"
    upgraded = fileindex.FileIndex(tmp_path, tmp_path / "data", "featpipe 1, Pillow 2")
    assert upgraded.unchanged(f, st) == "ab" * 32 and upgraded.failure(f) is None
    # a batched decoder may take what Pillow fails
    by_pil = fileindex.FileIndex(tmp_path, tmp_path / "data", decoders_version("pil"))
    by_pil.record(f, st, "ab" * 32, st.st_ctime_ns + 10**10)
    by_pil.record_failure(f, "decode failed: truncated")
    by_pil.save()
    for decoder, reason in (("pil", "decode failed: truncated"), ("torchvision", None)):
        index = fileindex.FileIndex(tmp_path, tmp_path / "data", decoders_version(decoder))
        assert index.unchanged(f, st) == "ab" * 32 and index.failure(f) == reason, decoder


def test_a_folder_without_class_folders_is_embedded_unlabelled(tmp_path, shipped):
    """extract embeds every image of a folder without subfolders, label ""; training commands refuse it in one
    line before embedding anything."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(shipped.glob("*/*.jpg"))[:6]:
        shutil.copy(p, flat / p.name)
    (flat / "notes.txt").write_text("not an image")
    res = run_json("extract", flat, "--cache-dir", tmp_path / "c", "--decoder", "pil")
    assert (res["images"], res["computed"]) == (7, 6) and [s["path"] for s in res["skipped"]] == [
        str(flat / "notes.txt")]
    with h5py.File(res["cache_file"], "r") as f:
        assert set(f["label"].asstr()[:]) == {""} and len(f["sha256"]) == 6
    proc = run_cli("fit-head", flat, "--cache-dir", tmp_path / "c2", "--out", tmp_path / "m")
    assert proc.returncode == 2 and "needs DATA_DIR/<class>/<image>" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "c2").exists()


def test_images_beside_class_folders_are_said_to_be_ignored(tmp_path, shipped, warm_cache):
    """An image at the top of a data dir that has class folders has no class: one stderr line says it is left out
    (a README there is not mentioned)."""
    data = make_subset(shipped, tmp_path / "data", 2)
    shutil.copy(next((shipped / "tools").iterdir()), data / "loose.jpg")
    (data / "README.txt").write_text("about these photos")
    proc = run_cli("extract", data, "--cache-dir", warm_cache, check=True)
    said = [line for line in proc.stderr.splitlines() if "ignored" in line]
    assert len(said) == 1 and "loose.jpg" in said[0] and "1 image file(s)" in said[0]
