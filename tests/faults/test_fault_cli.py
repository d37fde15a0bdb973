"""Misusing `featpipe extract`: one line on stderr, exit code 2, nothing on stdout, never a traceback."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli


def one_line_error(*args: str) -> str:
    proc = run_cli("extract", *args, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""
    return lines[0]


@pytest.mark.parametrize("args, says", [
    (("--bogus",), "--bogus"),
    (("--batch-size", "x"), "batch-size"),
    (("--batch-size", "0"), "batch-size"),
    (("--decoder", "gpu"), "--decoder"),
    (("/no/such/dir",), "not found"),
    (("--backbone", "mobilenet_v22"), "mobilenet_v2"),  # the close name is suggested
    (("--backbone", "efficientnet_lite9"), "efficientnet_lite"),
])
def test_bad_arguments(args, says):
    assert says in one_line_error(*args)


def test_data_dir_without_class_folders(tmp_path):
    """extract takes a folder of unlabelled images; here its one file is empty, so nothing is left to embed."""
    (tmp_path / "loose.jpg").write_bytes(b"")
    assert "no valid image" in one_line_error(str(tmp_path), "--cache-dir", str(tmp_path / ".c"))
    assert "not a directory" in one_line_error(str(tmp_path / "loose.jpg"))


def test_read_only_warm_cache_serves_every_command(small_data, tmp_path):
    """A shared team cache, warm and read-only: reading it needs no write access; nothing in it is touched."""
    from PIL import Image

    cache = tmp_path / "team"
    run_cli("extract", small_data, "--cache-dir", cache, check=True)
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    cache.chmod(0o555)
    try:
        for args in (["extract", small_data], ["fit-head", small_data, "--out", tmp_path / "m", "--val-fraction", "0"]):
            run_cli(*args, "--cache-dir", cache, check=True)
        assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before
        Image.new("RGB", (64, 48), (200, 30, 90)).save(small_data / "tools" / "new.jpg")
        assert "not writable and this run has new images" in one_line_error(str(small_data), "--cache-dir",
                                                                             str(cache))
    finally:
        cache.chmod(0o755)


def test_read_only_cache_dir(small_data, tmp_path):
    """Mode 555 means read-only even to root (who could write anyway): nothing written, one line."""
    cache = tmp_path / "ro"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        assert "not writable" in one_line_error(str(small_data), "--cache-dir", str(cache))
        assert list(cache.iterdir()) == []
    finally:
        cache.chmod(0o755)


def test_bad_weights_files(small_data, tmp_path):
    """--weights that is a folder, garbage bytes, an empty file (torch.load raises a message-less EOFError: its
    first line was an IndexError traceback), or a loadable file holding no state dict."""
    import torch

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    for path, says in ((tmp_path, "is not a file"), (tmp_path / "garbage.pth", "cannot read weights"),
                       (tmp_path / "empty.pth", "is empty"),
                       (tmp_path / "list.pth", "hold a list, not a state dict")):
        assert says in one_line_error(str(small_data), "--cache-dir", str(tmp_path / "c"), "--weights", str(path))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_fails_even_when_everything_is_cached(warm_cache):
    assert "no CUDA GPU" in one_line_error("--cache-dir", str(warm_cache), "--device", "cuda")
