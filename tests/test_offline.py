"""Backbones whose weights need a download: offline they fail at once with one line, online they still download.

No test touches the internet: "offline" is a hub endpoint that refuses connections or a proxy that never answers
(a firewall dropping packets), "online" is a local server speaking the Hugging Face hub's download protocol.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli, run_json

TIMM_MODEL, TIMM_REPO = "test_vit", "timm/test_vit.r160_in1k"  # a tiny timm model whose weights live on the HF hub
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")


def no_downloads_env(tmp_path: Path, **extra: str) -> dict:
    """Empty hub caches, no proxy exemptions, no user-set offline mode: only `extra` decides how the network looks."""
    env = {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_OFFLINE": "",
           "NO_PROXY": "", "no_proxy": "", "HF_ENDPOINT": "https://huggingface.co"}
    return {**env, **{v: "" for v in PROXY_VARS}, **extra}


@pytest.fixture
def silent_proxy():
    """A proxy that accepts connections (the kernel does, from the listen backlog) and never says a word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def refused_endpoint() -> str:
    """A hub address nothing listens on: connections are refused at once, as on a machine with no network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def assert_one_line_offline_error(proc, name: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert f"pretrained weights for {name!r} are not available offline" in lines[0]
    assert "Retrying" not in proc.stderr and "Traceback" not in proc.stderr


def timed_cli(*args, limit: float, **kw):
    """run_cli, and how long it took; a run still going after `limit` s (the old behaviour: minutes) fails."""
    t0 = time.perf_counter()
    try:
        proc = run_cli(*args, timeout=limit, **kw)
    except subprocess.TimeoutExpired:
        pytest.fail(f"featpipe {' '.join(map(str, args))} still running after {limit} s")
    return proc, time.perf_counter() - t0


def test_unreachable_hf_hub_fails_at_once_without_retries(tmp_path, small_data, refused_endpoint):
    """huggingface_hub retried each of the two files timm tries 5 times with backoff: ~46 s, 22 warning lines."""
    env = no_downloads_env(tmp_path, HF_ENDPOINT=refused_endpoint)
    proc, seconds = timed_cli("extract", small_data, "-b", TIMM_MODEL, "--cache-dir", tmp_path / "c", "--json",
                              limit=120, env=env)
    assert_one_line_offline_error(proc, TIMM_MODEL)
    assert proc.stdout == "" and "Connection refused" in proc.stderr
    assert seconds < 30, f"{seconds:.1f} s to say the hub cannot be reached"


@pytest.mark.parametrize("name", [TIMM_MODEL, "resnet18"])
def test_stalled_network_fails_within_the_timeout(tmp_path, small_data, silent_proxy, name):
    """A proxy that never answers: torch.hub waited forever (no timeout), huggingface_hub for minutes."""
    env = no_downloads_env(tmp_path, **{v: silent_proxy for v in PROXY_VARS})
    proc, seconds = timed_cli("extract", small_data, "-b", name, "--cache-dir", tmp_path / "c", limit=90, env=env)
    assert_one_line_offline_error(proc, name)
    assert "timed out" in proc.stderr
    assert seconds < 60


class FakeHub(http.server.BaseHTTPRequestHandler):
    """The two requests hf_hub_download makes for a file: HEAD (commit, etag, size) and GET (the bytes)."""

    files: dict[str, bytes] = {}

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        data = self.files.get(self.path)
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_hub(tmp_path):
    """A local hub serving test_vit weights (a seeded random init) as timm asks for them; yields (url, file)."""
    import safetensors.torch
    import timm
    import torch

    torch.manual_seed(0)
    weights = tmp_path / "model.safetensors"
    safetensors.torch.save_file(timm.create_model(TIMM_MODEL).state_dict(), weights)
    FakeHub.files = {f"/{TIMM_REPO}/resolve/main/model.safetensors": weights.read_bytes()}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", weights
    server.shutdown()
    server.server_close()


def expected_sha_prefix(weights: Path) -> str:
    """featpipe's weights hash for a timm model (its state without the ImageNet classifier), first 12 digits."""
    import safetensors.torch
    import timm

    from featpipe.backbone import _state_sha256

    model = timm.create_model(TIMM_MODEL)
    model.load_state_dict(safetensors.torch.load_file(weights))
    model.reset_classifier(0)
    return _state_sha256(model)[:12]


def test_hub_download_online_then_cached_weights_need_no_network(tmp_path, small_data, fake_hub, silent_proxy):
    """Online, timm downloads as before; after that the HF hub cache counts as offline weights, and a run on a
    stalled network loads them without asking the hub (no etag timeout per load)."""
    url, weights = fake_hub
    online = no_downloads_env(tmp_path, HF_ENDPOINT=url)
    res = run_json("extract", small_data, "-b", TIMM_MODEL, "--cache-dir", tmp_path / "c", env=online)
    sha = expected_sha_prefix(weights)
    assert res["computed"] == 20 and f"{TIMM_MODEL}-{sha}-" in res["cache_file"]

    stalled = no_downloads_env(tmp_path, HF_ENDPOINT=url, **{v: silent_proxy for v in PROXY_VARS})
    probe = subprocess.run([sys.executable, "-c", "from featpipe import registry; "
                            f"print(registry.resolve({TIMM_MODEL!r}).weights_available())"],
                           capture_output=True, text=True, timeout=120, env={**os.environ, **stalled})
    assert probe.stdout.strip() == "True", probe.stderr[-2000:]
    again = run_json("extract", small_data, "-b", TIMM_MODEL, "--cache-dir", tmp_path / "c2", env=stalled,
                     timeout=120)
    assert again["computed"] == 20 and f"{TIMM_MODEL}-{sha}-" in again["cache_file"]
