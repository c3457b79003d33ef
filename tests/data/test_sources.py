"""fetch_archive against real local servers: http on 127.0.0.1, moto S3, a Drive imitation."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

import pytest

from ferflow.config import ArchiveSpec, FetchSettings
from ferflow.data import fetchers, sources
from ferflow.data.sources import FetchResult, fetch_all, fetch_archive, sha256_file
from ferflow.errors import FerflowError

PAYLOAD = bytes(range(256)) * 4000  # ~1 MB, several chunks
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
# timeout_s bounds a request to the in-process server; no test waits for it to pass, so it is
# generous for a busy machine.
FAST = FetchSettings(retries=2, backoff_s=0.01, max_backoff_s=0.02, timeout_s=60, chunk_bytes=64 * 1024,
                     progress=False)


# ---------------------------------------------------------------------------- local http server


@dataclass
class Behaviour:
    """What the server does; tests change it between fetches."""

    files: dict[str, bytes] = field(default_factory=lambda: {"/a.zip": PAYLOAD})
    status: Optional[int] = None  # answer every request with this status
    truncate: int = 0  # cut this many responses short (at half their body), then behave
    ignore_range: bool = False
    unsatisfiable_from: Optional[int] = None  # 416 for a Range starting at or past this
    drive_id: Optional[str] = None  # serve files["/a.zip"] for GET /uc?id=<drive_id>
    seen: list[dict] = field(default_factory=list)


class Handler(BaseHTTPRequestHandler):
    behaviour: Behaviour

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        b = self.behaviour
        url = urllib.parse.urlsplit(self.path)
        b.seen.append({"path": url.path, "range": self.headers.get("Range"), "query": url.query})
        if b.status is not None:
            return self._send(b.status, b"busy")
        body = self._body(url)
        if body is None:
            return self._send(404, b"not found")
        start = self._range_start()
        if start is not None and b.unsatisfiable_from is not None and start >= b.unsatisfiable_from:
            return self._send(416, b"")
        if start is not None and not b.ignore_range:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            body = body[start:]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        if b.drive_id:
            self.send_header("Content-Disposition", 'attachment; filename="a.zip"')
        self.end_headers()
        if b.truncate > 0:
            b.truncate -= 1
            body = body[: len(body) // 2]
        self.wfile.write(body)

    def _body(self, url: urllib.parse.SplitResult) -> Optional[bytes]:
        b = self.behaviour
        if b.drive_id and url.path == "/uc":
            ids = urllib.parse.parse_qs(url.query).get("id", [])
            return b.files["/a.zip"] if ids == [b.drive_id] else None
        return b.files.get(url.path)

    def _range_start(self) -> Optional[int]:
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        return int(match.group(1)) if match else None

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class LocalHTTP:
    def __init__(self) -> None:
        self.behaviour = Behaviour()
        handler = type("BoundHandler", (Handler,), {"behaviour": self.behaviour})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def url(self, path: str = "/a.zip") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    @property
    def seen(self) -> list[dict]:
        return self.behaviour.seen

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http():
    server = LocalHTTP()
    yield server
    server.close()


def spec(uri: str, sha256: str = DIGEST, size: Optional[int] = len(PAYLOAD), name: str = "a") -> ArchiveSpec:
    return ArchiveSpec(name=name, uri=uri, sha256=sha256, size=size)


def spy_sleep(monkeypatch) -> list[float]:
    """The backoff waits fetch asks for (still slept): what bounds a failing fetch's time,
    checked without a wall-clock limit that a busy machine could miss."""
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(fetchers, "backoff_sleep", sleep)
    return waits


def resumed_at(request: dict) -> int:
    match = re.fullmatch(r"bytes=(\d+)-", request["range"] or "")
    assert match, f"expected a Range request, got {request}"
    return int(match.group(1))


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


# ---------------------------------------------------------------------------- http(s)


def test_http_download_then_reuse_without_network(http, tmp_path):
    result = fetch_archive(spec(http.url()), tmp_path, FAST)
    assert result == FetchResult("a", tmp_path / "a.zip", DIGEST, len(PAYLOAD), downloaded=True)
    assert (tmp_path / "a.zip").read_bytes() == PAYLOAD
    assert leftovers(tmp_path) == [".a.zip.verified", "a.zip"]  # no .part

    again = fetch_archive(spec(http.url()), tmp_path, FAST)
    assert again.downloaded is False and again.sha256 == DIGEST
    assert len(http.seen) == 1


def test_reuse_without_stamp_rehashes_and_does_not_download(http, tmp_path):
    (tmp_path / "a.zip").write_bytes(PAYLOAD)
    result = fetch_archive(spec(http.url()), tmp_path, FAST)
    assert result.downloaded is False
    assert http.seen == []
    assert (tmp_path / ".a.zip.verified").is_file()


def test_corrupted_destination_is_replaced(http, tmp_path):
    fetch_archive(spec(http.url()), tmp_path, FAST)
    damaged = bytearray(PAYLOAD)
    damaged[1000] ^= 0xFF  # same size, so only the digest can tell
    (tmp_path / "a.zip").write_bytes(bytes(damaged))
    os.utime(tmp_path / "a.zip", ns=(1, 1))  # the stamp no longer matches
    result = fetch_archive(spec(http.url()), tmp_path, FAST)
    assert result.downloaded is True
    assert (tmp_path / "a.zip").read_bytes() == PAYLOAD
    assert len(http.seen) == 2


def test_truncated_download_resumes_with_range(http, tmp_path):
    http.behaviour.truncate = 1
    result = fetch_archive(spec(http.url()), tmp_path, FAST)
    assert result.sha256 == DIGEST and sha256_file(tmp_path / "a.zip") == DIGEST
    assert http.seen[0]["range"] is None
    assert 0 < resumed_at(http.seen[1]) <= len(PAYLOAD) // 2  # bytes still in the read buffer are lost


def test_server_ignoring_range_restarts_from_zero(http, tmp_path):
    http.behaviour.truncate = 1
    http.behaviour.ignore_range = True
    fetch_archive(spec(http.url()), tmp_path, FAST)
    assert (tmp_path / "a.zip").read_bytes() == PAYLOAD
    assert 0 < resumed_at(http.seen[1]) <= len(PAYLOAD) // 2


def test_range_not_satisfiable_restarts(http, tmp_path):
    (tmp_path / "a.zip.part").write_bytes(b"x" * len(PAYLOAD))  # stale partial, full length
    http.behaviour.unsatisfiable_from = len(PAYLOAD)
    fetch_archive(spec(http.url()), tmp_path, FAST)
    assert (tmp_path / "a.zip").read_bytes() == PAYLOAD
    assert [r["range"] for r in http.seen] == [f"bytes={len(PAYLOAD)}-", None]


def test_unsized_spec_detects_truncation_by_content_length(http, tmp_path):
    http.behaviour.truncate = 2
    result = fetch_archive(spec(http.url(), size=None), tmp_path, FAST)
    assert result.size == len(PAYLOAD) and len(http.seen) == 3


def test_sha256_mismatch_removes_everything(http, tmp_path):
    wrong = "0" * 64
    with pytest.raises(FerflowError) as info:
        fetch_archive(spec(http.url(), sha256=wrong), tmp_path, FAST)
    message = str(info.value)
    assert http.url() in message and wrong in message and DIGEST in message
    assert leftovers(tmp_path) == []


def test_size_mismatch_is_reported(http, tmp_path):
    with pytest.raises(FerflowError, match=rf"gave {len(PAYLOAD)} bytes, expected size 5"):
        fetch_archive(spec(http.url(), size=5), tmp_path, FAST)
    assert leftovers(tmp_path) == []


def test_server_errors_are_retried_with_bounded_attempts(http, tmp_path, monkeypatch):
    http.behaviour.status = 503
    waits = spy_sleep(monkeypatch)
    with pytest.raises(FerflowError, match=r"after 3 attempts: HTTP 503"):
        fetch_archive(spec(http.url()), tmp_path, FAST)
    assert waits == [0.01, 0.02]  # the configured backoff between attempts, and no other wait
    assert len(http.seen) == FAST.retries + 1
    assert leftovers(tmp_path) == []


def test_backoff_doubles_and_is_capped(http, tmp_path, monkeypatch):
    delays: list[float] = []
    monkeypatch.setattr(fetchers, "backoff_sleep", delays.append)
    http.behaviour.status = 429
    settings = FetchSettings(retries=4, backoff_s=1.0, max_backoff_s=3.0, timeout_s=5, progress=False)
    with pytest.raises(FerflowError, match="after 5 attempts"):
        fetch_archive(spec(http.url()), tmp_path, settings)
    assert delays == [1.0, 2.0, 3.0, 3.0]


def test_closed_port_fails_after_bounded_attempts(tmp_path, monkeypatch, refused_port):
    uri = f"http://127.0.0.1:{refused_port}/a.zip"
    waits = spy_sleep(monkeypatch)
    with pytest.raises(FerflowError, match=r"could not download .* after 3 attempts: ConnectionError .*Connection refused"):
        fetch_archive(spec(uri), tmp_path, FAST)
    assert waits == [0.01, 0.02]
    assert leftovers(tmp_path) == []


def test_not_found_fails_at_once_without_leaking_credentials(http, tmp_path):
    port = http.server.server_address[1]
    uri = f"http://user:s3cret@127.0.0.1:{port}/missing.zip?token=t0ken"
    with pytest.raises(FerflowError) as info:
        fetch_archive(spec(uri), tmp_path, FAST)
    message = str(info.value)
    assert "HTTP 404" in message and f"127.0.0.1:{port}/missing.zip" in message
    assert "s3cret" not in message and "t0ken" not in message
    assert len(http.seen) == 1
    assert leftovers(tmp_path) == []


def test_exhausted_retries_keep_partial_for_next_run(http, tmp_path):
    http.behaviour.truncate = 10
    settings = FAST.model_copy(update={"retries": 1})
    with pytest.raises(FerflowError, match="after 2 attempts: "):
        fetch_archive(spec(http.url()), tmp_path, settings)
    part = tmp_path / "a.zip.part"
    kept = part.stat().st_size
    assert 0 < kept < len(PAYLOAD)
    assert leftovers(tmp_path) == ["a.zip.part"]

    http.behaviour.truncate = 0
    fetch_archive(spec(http.url()), tmp_path, settings)
    assert http.seen[-1]["range"] == f"bytes={kept}-"
    assert (tmp_path / "a.zip").read_bytes() == PAYLOAD and not part.exists()


# ---------------------------------------------------------------------------- S3


def test_s3_download(s3_env, tmp_path):
    s3_env.make_bucket("archives")
    s3_env.client().put_object(Bucket="archives", Key="raw/a.zip", Body=PAYLOAD)
    result = fetch_archive(spec("s3://archives/raw/a.zip"), tmp_path, FAST)
    assert result.downloaded and (tmp_path / "a.zip").read_bytes() == PAYLOAD


def test_s3_missing_key_and_bucket(s3_env, tmp_path):
    s3_env.make_bucket("archives-empty")
    with pytest.raises(FerflowError, match=r"s3://archives-empty/nope.zip: no such object"):
        fetch_archive(spec("s3://archives-empty/nope.zip"), tmp_path, FAST)
    with pytest.raises(FerflowError, match=r"s3://no-such-bucket/a.zip: bucket no-such-bucket does not exist"):
        fetch_archive(spec("s3://no-such-bucket/a.zip"), tmp_path, FAST)
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------- Google Drive


DRIVE_ID = "1AbCdEfGhIjKlMnOpQrStUvWxYz012345"


@pytest.mark.parametrize(
    "uri",
    [
        f"gdrive://{DRIVE_ID}",
        f"https://drive.google.com/file/d/{DRIVE_ID}/view?usp=sharing",
        f"https://drive.google.com/uc?id={DRIVE_ID}&export=download",
        f"https://drive.google.com/open?id={DRIVE_ID}",
    ],
)
def test_gdrive_through_gdown(http, tmp_path, monkeypatch, uri):
    http.behaviour.drive_id = DRIVE_ID
    monkeypatch.setattr(fetchers, "GDRIVE_DOWNLOAD_URL", http.url("/uc"))
    result = fetch_archive(spec(uri), tmp_path, FAST)
    assert result.downloaded and (tmp_path / "a.zip").read_bytes() == PAYLOAD
    assert [r["query"] for r in http.seen] == [f"id={DRIVE_ID}"]
    assert leftovers(tmp_path) == [".a.zip.verified", "a.zip"]


def test_gdrive_failure_names_the_id(http, tmp_path, monkeypatch):
    http.behaviour.drive_id = "some-other-file"
    monkeypatch.setattr(fetchers, "GDRIVE_DOWNLOAD_URL", http.url("/uc"))
    with pytest.raises(FerflowError, match=f"file id {DRIVE_ID} failed"):
        fetch_archive(spec(f"gdrive://{DRIVE_ID}"), tmp_path, FAST)
    assert leftovers(tmp_path) == []


def test_drive_url_without_id_is_rejected(tmp_path):
    with pytest.raises(FerflowError, match="no Google Drive file id"):
        fetch_archive(spec("https://drive.google.com/drive/folders/"), tmp_path, FAST)


# ---------------------------------------------------------------------------- local files


@pytest.mark.parametrize("form", ["file-abs", "file-rel", "path-abs", "path-rel"])
def test_local_sources(tmp_path, monkeypatch, form):
    src = tmp_path / "src dir" / "a.zip"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    monkeypatch.chdir(tmp_path)
    uri = {
        "file-abs": src.as_uri(),
        "file-rel": "file://src%20dir/a.zip",
        "path-abs": str(src),
        "path-rel": "src dir/a.zip",
    }[form]
    result = fetch_archive(spec(uri), tmp_path / "raw", FAST)
    assert result.downloaded and (tmp_path / "raw" / "a.zip").read_bytes() == PAYLOAD


def test_missing_local_file_names_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FerflowError, match=re.escape(str(tmp_path / "nowhere.zip"))):
        fetch_archive(spec("file://nowhere.zip"), tmp_path / "raw", FAST)
    assert leftovers(tmp_path / "raw") == []


def test_unknown_scheme_lists_supported(tmp_path):
    with pytest.raises(FerflowError, match=r"unsupported URI scheme 'ftp'.*s3://bucket/key"):
        fetch_archive(spec("ftp://example.org/a.zip"), tmp_path, FAST)


def test_fetch_all_creates_dest_dir(http, tmp_path):
    http.behaviour.files["/b.zip"] = PAYLOAD
    dest = tmp_path / "deep" / "raw"
    results = fetch_all([spec(http.url(), name="a"), spec(http.url("/b.zip"), name="b")], dest, FAST)
    assert [r.path for r in results] == [dest / "a.zip", dest / "b.zip"]
    assert all(r.downloaded for r in results)


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(PAYLOAD)
    assert sha256_file(path, chunk=1000) == DIGEST


def test_s3_without_credentials_says_how_to_fix(s3_env, tmp_path, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(FerflowError, match=r"s3://archives/a.zip: no AWS credentials found.*AWS_ACCESS_KEY_ID"):
        fetch_archive(spec("s3://archives/a.zip"), tmp_path / "raw", FAST)


# ---------------------------------------------------------------------------- download (any file)


def test_download_any_file_returns_its_digest(http, tmp_path):
    http.behaviour.files["/weights.pt"] = PAYLOAD
    dest = tmp_path / "cache" / "w.pt"
    assert sources.download(http.url("/weights.pt"), dest, FAST) == DIGEST
    assert dest.read_bytes() == PAYLOAD and leftovers(dest.parent) == ["w.pt"]
    assert sources.download(http.url("/weights.pt"), dest, FAST, expected_sha256=DIGEST.upper()) == DIGEST


def test_download_digest_mismatch_and_truncation(http, tmp_path):
    http.behaviour.files["/weights.pt"] = PAYLOAD
    with pytest.raises(FerflowError, match=f"expected {'0' * 64}, got {DIGEST}"):
        sources.download(http.url("/weights.pt"), tmp_path / "w.pt", FAST, expected_sha256="0" * 64)
    assert leftovers(tmp_path) == []
    http.behaviour.truncate = 1  # resumed with Range, like archives
    assert sources.download(http.url("/weights.pt"), tmp_path / "w.pt", FAST) == DIGEST
    assert http.seen[-1]["range"] is not None


# ---------------------------------------------------------------------------- stale partial downloads


def test_stale_part_of_another_file_is_dropped_and_downloaded_again(http, tmp_path):
    # A `.part` left by a different file (another version, another uri): resuming it gives a
    # file of the right size and the wrong digest, which is no reason to doubt params.yaml.
    stale = bytes(reversed(PAYLOAD))[: len(PAYLOAD) // 3]
    (tmp_path / "a.zip.part").write_bytes(stale)
    result = fetch_archive(spec(http.url()), tmp_path, FAST)
    assert result.downloaded and (tmp_path / "a.zip").read_bytes() == PAYLOAD
    assert [r["range"] for r in http.seen] == [f"bytes={len(stale)}-", None]  # resumed, then once from zero
    assert leftovers(tmp_path) == [".a.zip.verified", "a.zip"]


def test_stale_part_for_download_is_dropped_and_downloaded_again(http, tmp_path):
    http.behaviour.files["/weights.pt"] = PAYLOAD
    (tmp_path / "w.pt.part").write_bytes(b"\xff" * 1000)
    assert sources.download(http.url("/weights.pt"), tmp_path / "w.pt", FAST, expected_sha256=DIGEST) == DIGEST
    assert [r["range"] for r in http.seen] == ["bytes=1000-", None]
    assert leftovers(tmp_path) == ["w.pt"]


def test_only_a_fresh_download_that_mismatches_blames_the_sha256(http, tmp_path):
    (tmp_path / "a.zip.part").write_bytes(PAYLOAD[:1000])
    with pytest.raises(FerflowError, match="update sha256 of 'a'") as info:
        fetch_archive(spec(http.url(), sha256="0" * 64), tmp_path, FAST)
    assert "resumed" not in str(info.value)
    assert [r["range"] for r in http.seen] == ["bytes=1000-", None]  # the hint comes from the fresh download
    assert leftovers(tmp_path) == []


def test_fresh_download_mismatch_is_not_retried(http, tmp_path):
    with pytest.raises(FerflowError, match="update sha256"):
        fetch_archive(spec(http.url(), sha256="0" * 64), tmp_path, FAST)
    assert [r["range"] for r in http.seen] == [None]
