"""How the bytes of a source get into a `.part` file, one fetcher per URI scheme.

https/http (retries with capped exponential backoff, resume with Range requests), Google
Drive (through gdown), S3 (boto3's credential chain and endpoint settings) and local files
(a path or a file:// URI; a folder is packed into a deterministic zip, ferflow.data.packing).
`fetcher_for` picks one; ferflow.data.sources decides where the
`.part` goes, verifies it and renames it into place.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Optional

import requests

from ferflow.config import FetchSettings, uri_scheme
from ferflow.data.packing import pack_folder
from ferflow.errors import FerflowError
from ferflow.redact import redact_uri

log = logging.getLogger(__name__)

# What gdown is asked for; tests point it at a local server that imitates Drive.
GDRIVE_DOWNLOAD_URL = "https://drive.google.com/uc"
SUPPORTED = "https://, http://, Google Drive links, gdrive://<id>, s3://bucket/key, file://, a local path"
_DRIVE_HOSTS = {"drive.google.com", "docs.google.com"}
_RETRY_STATUS = {408, 429}


class _Transient(Exception):
    """An http failure worth another attempt (connection, timeout, truncation, 5xx)."""


class ResumableFailure(FerflowError):
    """Retries ran out on transient errors; the `.part` is kept for the next run."""


# ---------------------------------------------------------------------------- dispatch

# A fetcher writes the whole file to `part`; it returns True when it appended to bytes that
# were already there (an http Range resume): ferflow.data.sources then retries a download
# that fails verification once from zero.
Fetcher = Callable[[str, Path, Optional[int], FetchSettings], Optional[bool]]


def fetcher_for(uri: str) -> Fetcher:
    """The fetcher of `uri`'s scheme; an unsupported scheme is an error."""
    scheme = uri_scheme(uri)
    if scheme == "gdrive":
        return _fetch_gdrive
    if scheme in ("http", "https"):
        host = (urllib.parse.urlsplit(uri).hostname or "").lower()
        return _fetch_gdrive if host in _DRIVE_HOSTS else _fetch_http
    if scheme == "s3":
        return _fetch_s3
    if scheme == "file" or not scheme:
        return _fetch_file
    raise FerflowError(f"unsupported URI scheme {scheme!r} in {redact_uri(uri)}; supported: {SUPPORTED}")


# ---------------------------------------------------------------------------- http(s)


def _fetch_http(uri: str, part: Path, size: Optional[int], settings: FetchSettings) -> bool:
    retries, attempts = settings.retries, settings.retries + 1
    reason = ""
    with requests.Session() as session:
        # Byte offsets for Range must count the bytes on disk, not decoded ones.
        session.headers["Accept-Encoding"] = "identity"
        for attempt in range(attempts):
            if attempt:
                delay = min(settings.backoff_s * 2 ** (attempt - 1), settings.max_backoff_s)
                log.warning("%s: %s; retry %d/%d in %.1fs", redact_uri(uri), reason, attempt, retries, delay)
                backoff_sleep(delay)
            try:
                # The last attempt tells: one that restarted from zero wiped an earlier resume.
                return _http_attempt(session, uri, part, size, settings)
            except _Transient as exc:
                reason = str(exc)
    message = f"could not download {redact_uri(uri)} after {attempts} attempts: {reason}"
    if _size(part):
        raise ResumableFailure(f"{message} (partial file {part} kept; the next run resumes it)")
    raise FerflowError(f"{message}; check the uri and the network, or raise fetch.retries")


def backoff_sleep(seconds: float) -> None:
    """Wait between http retries; a module-level name so tests can record the waits."""
    time.sleep(seconds)


def _http_attempt(
    session: requests.Session, uri: str, part: Path, size: Optional[int], settings: FetchSettings
) -> bool:
    """One GET into `part`, continued with a Range request when it has bytes; True when the
    server did continue it (so `part` mixes this response with bytes written before)."""
    offset = _size(part)
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    timeout = (settings.timeout_s, settings.timeout_s)
    try:
        with session.get(uri, headers=headers, stream=True, timeout=timeout) as resp:
            if resp.status_code == 416 and offset:
                part.unlink()  # the server cannot continue our partial: start over
                return _http_attempt(session, uri, part, size, settings)
            _check_status(resp, uri)
            if resp.status_code == 206:
                if _range_start(resp) != offset:
                    part.unlink(missing_ok=True)
                    got = resp.headers.get("Content-Range")
                    raise _Transient(f"asked for bytes={offset}-, server sent range {got!r}")
                mode, total = "ab", _content_length(resp, offset)
            else:
                mode, total, offset = "wb", _content_length(resp, 0), 0  # Range ignored: restart
            with open(part, mode) as fh, _progress(part.stem, total, settings, offset) as advance:
                _write_chunks(resp.iter_content(settings.chunk_bytes), fh, advance)
    except requests.exceptions.SSLError as exc:
        raise FerflowError(f"TLS error for {redact_uri(uri)}: {_describe(exc)}; check the URL/CA setup") from None
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
        raise _Transient(f"{_describe(exc)} after {_size(part)} bytes") from None
    except requests.RequestException as exc:
        raise FerflowError(f"cannot download {redact_uri(uri)}: {_describe(exc)}") from None
    expected = total if total is not None else size
    if expected is not None and _size(part) < expected:
        raise _Transient(f"truncated body: {_size(part)} of {expected} bytes")
    return offset > 0


def _describe(exc: Exception) -> str:
    # str(exc) of requests errors repeats the URL with its query (tokens); keep only the OS cause.
    cause = re.search(r"\[Errno -?\d+\] [^'\")]+", str(exc))
    return f"{exc.__class__.__name__} ({cause.group(0)})" if cause else exc.__class__.__name__


def _check_status(resp: requests.Response, uri: str) -> None:
    code = resp.status_code
    if code >= 500 or code in _RETRY_STATUS:
        raise _Transient(f"HTTP {code} {resp.reason}")
    if code not in (200, 206):
        raise FerflowError(f"HTTP {code} {resp.reason} for {redact_uri(uri)}; check the uri in data.archives")


def _range_start(resp: requests.Response) -> Optional[int]:
    match = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _content_length(resp: requests.Response, offset: int) -> Optional[int]:
    value = resp.headers.get("Content-Length", "")
    return offset + int(value) if value.isdigit() else None


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


# ---------------------------------------------------------------------------- Google Drive


def drive_id(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme.lower() == "gdrive":
        found = (parts.netloc + parts.path).strip("/")
    else:
        match = re.search(r"/file/(?:u/\d+/)?d/([-\w]+)", parts.path)
        found = match.group(1) if match else urllib.parse.parse_qs(parts.query).get("id", [""])[0]
    if not re.fullmatch(r"[-\w]+", found):
        raise FerflowError(
            f"no Google Drive file id in {redact_uri(uri)}; use https://drive.google.com/file/d/<ID>/view "
            "or gdrive://<ID> (folders are not supported)"
        )
    return found


def _fetch_gdrive(uri: str, part: Path, size: Optional[int], settings: FetchSettings) -> None:
    import gdown

    file_id = drive_id(uri)
    # gdown keeps its own temp files next to its output; a private dir makes cleanup total.
    workdir = part.with_name(f".{part.name}.gdown")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    try:
        out = gdown.download(
            url=f"{GDRIVE_DOWNLOAD_URL}?id={file_id}",
            output=str(workdir / "archive"),
            quiet=not _show_progress(settings),
            use_cookies=False,  # do not read or write ~/.cache/gdown/cookies.txt
            timeout=(settings.timeout_s, settings.timeout_s),
            retries=settings.retries,
        )
        os.replace(out, part)
    except (gdown.exceptions.DownloadError, requests.RequestException, OSError, ValueError) as exc:
        detail = " ".join(str(exc).split())  # gdown's messages span lines; ours is one line
        raise FerflowError(
            f"Google Drive download of file id {file_id} failed: {detail}. Check that the file is shared "
            "as 'Anyone with the link' and not over its download quota"
        ) from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------- S3


def _fetch_s3(uri: str, part: Path, size: Optional[int], settings: FetchSettings) -> None:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    parts = urllib.parse.urlsplit(uri)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    if not bucket or not key:
        raise FerflowError(f"{uri}: expected s3://bucket/key")
    config = Config(
        retries={"max_attempts": settings.retries + 1, "mode": "standard"},
        connect_timeout=settings.timeout_s,
        read_timeout=settings.timeout_s,
    )
    try:
        # No endpoint here: AWS_ENDPOINT_URL, AWS_PROFILE and the credential chain apply; a fresh
        # session (not boto3's cached default) sees the environment as it is now.
        client = boto3.session.Session().client("s3", config=config)
        obj = client.get_object(Bucket=bucket, Key=key)
        total = obj.get("ContentLength")
        with open(part, "wb") as fh, _progress(part.stem, total, settings) as advance:
            _write_chunks(obj["Body"].iter_chunks(settings.chunk_bytes), fh, advance)
    except NoCredentialsError:
        raise FerflowError(
            f"{uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE "
            "(and AWS_ENDPOINT_URL for MinIO or another S3-compatible store)"
        ) from None
    except ClientError as exc:
        raise FerflowError(_s3_message(uri, bucket, exc)) from None
    except BotoCoreError as exc:
        hint = "check AWS_ENDPOINT_URL, AWS_PROFILE and the network"
        raise FerflowError(f"{uri}: S3 request failed: {exc}; {hint}") from None


def _s3_message(uri: str, bucket: str, exc: Exception) -> str:
    error = getattr(exc, "response", {}).get("Error", {})
    code = str(error.get("Code", ""))
    if code in ("NoSuchKey", "404"):
        return f"{uri}: no such object in bucket {bucket}; check the uri in data.archives (params.yaml)"
    if code == "NoSuchBucket":
        return f"{uri}: bucket {bucket} does not exist at this endpoint; check the name and AWS_ENDPOINT_URL"
    if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return f"{uri}: access denied ({code}); check the AWS credentials/AWS_PROFILE and AWS_ENDPOINT_URL"
    return f"{uri}: S3 error {code}: {error.get('Message', exc)}"


# ---------------------------------------------------------------------------- local files


def local_path(uri: str) -> Path:
    """`file:///abs`, `file://localhost/abs`; `file://rel` and `file:rel` are relative to cwd."""
    if uri.startswith("file:"):
        rest = uri[len("file:"):]
        rest = rest[2:] if rest.startswith("//") else rest
        rest = rest[len("localhost"):] if rest.startswith("localhost/") else rest
        return Path(urllib.parse.unquote(rest))
    return Path(uri).expanduser()


def _fetch_file(uri: str, part: Path, size: Optional[int], settings: FetchSettings) -> None:
    """A local zip is copied; a local folder is packed into a deterministic zip (ferflow.data.packing)."""
    source = local_path(uri)
    if source.is_dir():
        count = pack_folder(source, part)
        log.info("packed %d files of folder %s", count, source)
        return
    if not source.is_file():
        raise FerflowError(
            f"source archive not found: {source.resolve()} (from uri {uri!r}; relative paths are "
            f"resolved against {Path.cwd()}); expected a zip or a folder. Check the uri in data.archives (params.yaml)"
        )
    with open(source, "rb") as src, open(part, "wb") as fh:
        with _progress(part.stem, _size(source), settings) as advance:
            _write_chunks(iter(lambda: src.read(settings.chunk_bytes), b""), fh, advance)


# ---------------------------------------------------------------------------- plumbing


def _write_chunks(chunks: Iterable[bytes], fh: BinaryIO, advance: Callable[[int], None]) -> None:
    try:
        for chunk in chunks:
            fh.write(chunk)
            advance(len(chunk))
    finally:
        fh.flush()  # keep what arrived: an http retry resumes from it


def _show_progress(settings: FetchSettings) -> bool:
    return settings.progress and sys.stderr.isatty()


@contextmanager
def _progress(
    label: str, total: Optional[int], settings: FetchSettings, done: int = 0
) -> Iterator[Callable[[int], None]]:
    if not _show_progress(settings):
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total, completed=done)
        yield lambda n: bar.advance(task, n)
