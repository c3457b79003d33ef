"""load_pretrained: none, local files with sha256, URLs from a local http server downloaded
once, pickles converted to safetensors once."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ferflow.config import FetchSettings
from ferflow.errors import FerflowError
from ferflow.models import checkpoints
from ferflow.models.weights import load_pretrained

FAST = FetchSettings(retries=1, backoff_s=0.01, max_backoff_s=0.02, timeout_s=5, progress=False)


@pytest.fixture
def checkpoint(tmp_path) -> tuple[Path, dict[str, torch.Tensor], str]:
    torch.manual_seed(0)
    state = {"conv.weight": torch.randn(4, 3, 3, 3), "fc.weight": torch.randn(2, 4), "fc.bias": torch.zeros(2)}
    path = tmp_path / "src" / "model.pt"
    path.parent.mkdir()
    torch.save(state, path)
    return path, state, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def server(checkpoint):
    """Serves the checkpoint at /m.pt and counts requests."""
    body = checkpoint[0].read_bytes()
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append(self.path)
            ok = self.path.startswith("/m.pt")
            self.send_response(200 if ok else 404)
            self.send_header("Content-Length", str(len(body) if ok else 0))
            self.end_headers()
            if ok:
                self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()
    httpd.server_close()


def assert_same(weights, state):
    assert set(weights.state_dict) == set(state)
    for key, value in state.items():
        assert torch.equal(weights.state_dict[key], value)


@pytest.mark.parametrize("source", [None, "none", "None", ""])
def test_none_means_random_init(tmp_path, source):
    assert load_pretrained(source, tmp_path) is None


def test_local_path_verified(checkpoint, tmp_path):
    path, state, digest = checkpoint
    weights = load_pretrained(str(path), tmp_path / "cache", expected_sha256=digest)
    assert_same(weights, state)
    assert weights.sha256 == digest and weights.source == str(path) and weights.meta["format"] == "safetensors"
    assert (tmp_path / "cache" / "safetensors" / f"{digest}.safetensors").is_file()
    assert_same(load_pretrained(path.as_uri(), tmp_path / "cache"), state)  # file:// too


def test_local_path_wrong_sha256_is_refused(checkpoint, tmp_path):
    path, _, digest = checkpoint
    with pytest.raises(FerflowError, match=f"sha256 mismatch: expected {'0' * 64}, got {digest}"):
        load_pretrained(path, tmp_path / "cache", expected_sha256="0" * 64)


def test_missing_local_file(tmp_path):
    with pytest.raises(FerflowError, match="pretrained weights not found"):
        load_pretrained(tmp_path / "nope.pt", tmp_path)


def test_safetensors_file_read_directly(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    safetensors.torch.save_file(state, str(tmp_path / "w.safetensors"))
    assert_same(load_pretrained(tmp_path / "w.safetensors", tmp_path / "cache"), state)
    assert not (tmp_path / "cache").exists()  # nothing to convert


def test_url_downloaded_once_and_pickle_parsed_once(checkpoint, server, tmp_path, monkeypatch):
    _, state, digest = checkpoint
    base, seen = server
    parsed = []
    original = checkpoints._unpickle_zip
    monkeypatch.setattr(checkpoints, "_unpickle_zip", lambda path: parsed.append(path) or original(path))
    url = f"{base}/m.pt?raw=true&token=s3cret"
    cache = tmp_path / "cache"

    first = load_pretrained(url, cache, expected_sha256=digest, fetch_settings=FAST)
    second = load_pretrained(url, cache, expected_sha256=digest, fetch_settings=FAST)
    assert len(seen) == 1 and len(parsed) == 1
    assert_same(first, state) and assert_same(second, state)
    assert first.sha256 == digest and "s3cret" not in first.source
    downloads = list((cache / "downloads").iterdir())
    assert len(downloads) == 1 and downloads[0].suffix == ".pt"
    assert (cache / "safetensors" / f"{digest}.safetensors").is_file()


def test_url_wrong_sha256_leaves_nothing(server, tmp_path):
    base, _ = server
    with pytest.raises(FerflowError, match="sha256 mismatch"):
        load_pretrained(f"{base}/m.pt", tmp_path, expected_sha256="f" * 64, fetch_settings=FAST)
    assert list((tmp_path / "downloads").iterdir()) == []


def test_cached_download_not_matching_is_fetched_again(checkpoint, server, tmp_path):
    _, state, digest = checkpoint
    base, seen = server
    load_pretrained(f"{base}/m.pt", tmp_path, fetch_settings=FAST)
    [cached] = (tmp_path / "downloads").iterdir()
    cached.write_bytes(b"damaged")
    assert_same(load_pretrained(f"{base}/m.pt", tmp_path, expected_sha256=digest, fetch_settings=FAST), state)
    assert len(seen) == 2


def test_http_error_is_a_ferflow_error(server, tmp_path):
    base, _ = server
    with pytest.raises(FerflowError, match="HTTP 404"):
        load_pretrained(f"{base}/missing.pt", tmp_path, fetch_settings=FAST)
