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
from ferflow.models import unpickler
from ferflow.models.weights import load_pretrained

# timeout_s bounds a request to the in-process server; generous, as no test waits for it to pass.
FAST = FetchSettings(retries=1, backoff_s=0.01, max_backoff_s=0.02, timeout_s=60, progress=False)


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
    original = unpickler.unpickle_zip
    monkeypatch.setattr(unpickler, "unpickle_zip", lambda path: parsed.append(path) or original(path))
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


# --- size bombs: small files declaring huge tensors --------------------------------------

BOMB_BYTES = 512 << 20  # the case: a ~0.5 MB .pt declaring a 512 MiB tensor

RSS_PROBE = r"""
import json, resource, sys
from pathlib import Path
from ferflow.errors import FerflowError
from ferflow.models.weights import load_pretrained

def peak_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

source, cache, limit = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
kwargs = {}
if limit:
    from ferflow.models.checkpoints import SizeLimit
    kwargs["size_limit"] = SizeLimit(limit, "the test's model")
before = peak_kib()
try:
    load_pretrained(source, cache, **kwargs)
    error = None
except FerflowError as exc:
    error = str(exc)
print(json.dumps({"grew_mib": (peak_kib() - before) / 1024, "error": error}))
"""


def _probe(source: Path, cache: Path, limit: int = 0) -> dict:
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", RSS_PROBE, str(source), str(cache), str(limit)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_deflated_size_bomb_is_refused_before_it_is_inflated(tmp_path):
    """A 0.5 MB .pt whose storage record inflates to 512 MiB: refused from the sizes its zip
    records declare, before a byte is inflated; RSS barely moves and nothing is cached."""
    from . import bombs

    bomb = bombs.write_deflated(tmp_path / "bomb.pt", BOMB_BYTES)
    assert bomb.stat().st_size < 1 << 20
    result = _probe(bomb, tmp_path / "cache")
    assert result["error"] is not None, result
    assert str(bomb) in result["error"] and "refusing" in result["error"], result
    assert result["grew_mib"] < 64, result
    assert not list((tmp_path / "cache").rglob("*.safetensors")), "a refused checkpoint must not be cached"
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_sparse_size_bomb_is_refused_against_the_model_size(tmp_path):
    """A stored (uncompressed) 512 MiB record written as a hole: the file is as big as it
    claims, so only the model's own size can refuse it, again before anything is read."""
    from . import bombs

    bomb = bombs.write_sparse(tmp_path / "sparse.pt", BOMB_BYTES)
    assert bomb.stat().st_blocks * 512 < 1 << 20  # really sparse on this filesystem
    result = _probe(bomb, tmp_path / "cache", limit=64 << 20)
    assert result["error"] is not None and str(bomb) in result["error"], result
    assert "512.0 MiB" in result["error"] and "the test's model" in result["error"], result
    assert result["grew_mib"] < 64, result
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_size_limit_also_guards_safetensors_and_the_cache(tmp_path):
    """The cap holds for .safetensors given directly and for a conversion cached by an
    earlier, uncapped load: the cached copy is checked like the original."""
    from ferflow.models.checkpoints import SizeLimit

    state = {"w": torch.zeros(1024, 1024)}  # 4 MiB
    direct = tmp_path / "w.safetensors"
    safetensors.torch.save_file(state, str(direct))
    pickle_file = tmp_path / "w.pt"
    torch.save(state, pickle_file)
    small = SizeLimit(1 << 20, "a 1 MiB model")
    with pytest.raises(FerflowError, match=r"w\.safetensors.*4\.0 MiB.*a 1 MiB model"):
        load_pretrained(direct, tmp_path / "cache", size_limit=small)
    assert_same(load_pretrained(pickle_file, tmp_path / "cache"), state)  # uncapped: converted and cached
    with pytest.raises(FerflowError, match=r"4\.0 MiB.*a 1 MiB model"):
        load_pretrained(pickle_file, tmp_path / "cache", size_limit=small)
    assert_same(load_pretrained(pickle_file, tmp_path / "cache", size_limit=SizeLimit(8 << 20, "big")), state)
