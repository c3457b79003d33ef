"""Fetch source archives from https, Google Drive, S3 or local paths, verified by sha256.

Every download lands in `<dest>/<name>.zip.part`, is checked (size, then sha256) and only
then renamed onto `<name>.zip`, so a `.zip` in dest_dir is always a verified archive.

Partial files: a `.part` is deleted after any failure, except when an http(s) download
ran out of retries on a transient error; that one is kept so the next run resumes it with
a Range request. A resumed file that then fails its size or digest check may hold bytes of
another file (a stale `.part`, a source changed in between): it is deleted and downloaded
once more from zero, and only a fresh download that still mismatches blames the sha256.

A verified archive gets a hidden stamp `.<name>.zip.verified` (size, mtime_ns, sha256) so
that later runs skip re-hashing while size and mtime are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Optional

import requests

from ferflow.config import ArchiveSpec, FetchSettings
from ferflow.errors import FerflowError
from ferflow.fileio import atomic_write_text, sha256_file
from ferflow.redact import is_redacted, redact_uri

log = logging.getLogger(__name__)

# What gdown is asked for; tests point it at a local server that imitates Drive.
GDRIVE_DOWNLOAD_URL = "https://drive.google.com/uc"
SUPPORTED = "https://, http://, Google Drive links, gdrive://<id>, s3://bucket/key, file://, a local path"
_DRIVE_HOSTS = {"drive.google.com", "docs.google.com"}
_RETRY_STATUS = {408, 429}


@dataclass(frozen=True)
class FetchResult:
    name: str
    path: Path
    sha256: str
    size: int
    downloaded: bool  # False when an already-verified file was reused
    from_dvc_remote: bool = False  # the bytes came from the DVC remote by md5, not the params URI


class _Transient(Exception):
    """An http failure worth another attempt (connection, timeout, truncation, 5xx)."""


class _ResumableFailure(FerflowError):
    """Retries ran out on transient errors; the `.part` is kept for the next run."""


class _Mismatch(FerflowError):
    """A finished download failed its size or digest check."""


# ---------------------------------------------------------------------------- public API


def fetch_all(
    specs: Iterable[ArchiveSpec], dest_dir: Path, settings: FetchSettings
) -> list[FetchResult]:
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    return [fetch_archive(spec, dest_dir, settings) for spec in specs]


def fetch_archive(spec: ArchiveSpec, dest_dir: Path, settings: FetchSettings) -> FetchResult:
    dest_dir = Path(dest_dir)
    dest = dest_dir / f"{spec.name}.zip"
    fetcher = _pick_fetcher(spec.uri)  # a bad uri is reported even when the file is present
    if dest.is_file():
        if _already_verified(dest, spec, settings.chunk_bytes):
            log.info("%s: %s already verified, not downloading", spec.name, dest)
            return FetchResult(spec.name, dest, spec.sha256, dest.stat().st_size, downloaded=False)
        log.warning("%s: %s does not match params; downloading it again", spec.name, dest)
    if is_redacted(spec.uri):
        # Compiled pipelines carry URIs with their credentials masked (ferflow.redact).
        raise FerflowError(
            f"{spec.name}: uri {spec.uri} had its credentials removed when the pipeline was compiled; "
            f"pass the real URI at run time (pipeline parameter `archives`) or pin the archive in dvc.lock "
            f"and a DVC remote"
        )
    dest_dir.mkdir(parents=True, exist_ok=True)
    part = dest_dir / f"{spec.name}.zip.part"
    log.info("%s: fetching %s", spec.name, redact_uri(spec.uri))

    def fetch() -> Optional[bool]:
        return fetcher(spec.uri, part, spec.size, settings)

    def verify(resumed: bool) -> str:
        return _verify(part, spec, settings.chunk_bytes, resumed)

    digest = _through_part(part, dest, fetch, verify, spec.name)
    _write_stamp(dest, digest)
    return FetchResult(spec.name, dest, digest, dest.stat().st_size, downloaded=True)


def download(uri: str, dest: Path, settings: FetchSettings, expected_sha256: str | None = None) -> str:
    """Fetch any file (model weights, ...) to `dest` through `<dest>.part`; return its sha256.

    Same schemes, retries, resume and cleanup as fetch_archive; `dest` appears only once
    complete and, when `expected_sha256` is given, verified.
    """
    dest = Path(dest)
    fetcher = _pick_fetcher(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.part")
    log.info("fetching %s to %s", redact_uri(uri), dest)

    def fetch() -> Optional[bool]:
        return fetcher(uri, part, None, settings)

    def check(resumed: bool) -> str:
        digest = sha256_file(part, settings.chunk_bytes)
        if expected_sha256 is not None and digest != expected_sha256.strip().lower():
            hint = _RESUMED_HINT if resumed else "If the source changed on purpose, update the sha256 given for it"
            raise _Mismatch(
                f"sha256 mismatch for {redact_uri(uri)}: expected {expected_sha256.strip().lower()}, got {digest} "
                f"({_size(part)} bytes); the download was removed. {hint}"
            )
        return digest

    return _through_part(part, dest, fetch, check, redact_uri(uri))


REMOTE_SCHEMES = ("http", "https", "s3", "gdrive")


def cache_root() -> Path:
    """Where downloaded weights live: $FERFLOW_CACHE, else $XDG_CACHE_HOME/ferflow or ~/.cache/ferflow."""
    root = os.environ.get("FERFLOW_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                           "ferflow")
    return Path(root).expanduser()


def is_remote(source: str) -> bool:
    return "://" in source and urllib.parse.urlsplit(source).scheme.lower() in REMOTE_SCHEMES


def resolve_file(source: str, folder: Path, expected: str | None, settings: FetchSettings, what: str) -> tuple[Path, str]:
    """(local path, sha256) of a file given as a URI (downloaded once into `folder`) or a path.

    A download is named by the URI (tokens included, so two signed URLs of one file do not
    collide on a wrong cached copy) and reused while it matches `expected`."""
    expected = expected.strip().lower() if expected else None
    if not is_remote(source):
        path = local_path(source)  # also unwraps file:// URIs
        if not path.is_file():
            raise FerflowError(f"{what} not found: {path.resolve()} (from {source!r})")
        digest = sha256_file(path)
        if expected is not None and digest != expected:
            raise FerflowError(f"{what} {path}: sha256 mismatch: expected {expected}, got {digest}; "
                               "check the file or the sha256 given for it in params.yaml")
        return path, digest
    suffix = Path(urllib.parse.urlsplit(source).path).suffix
    suffix = suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,12}", suffix) else ".bin"
    dest = Path(folder) / f"{hashlib.sha256(source.encode()).hexdigest()[:24]}{suffix}"
    if dest.is_file():
        digest = sha256_file(dest)
        if expected is None or digest == expected:
            log.info("%s: using cached %s for %s", what, dest, redact_uri(source))
            return dest, digest
        log.warning("cached %s does not match sha256 %s; downloading it again", dest, expected)
        dest.unlink()
    return dest, download(source, dest, settings, expected)


def _through_part(part: Path, dest: Path, fetch: Callable[[], Optional[bool]], check: Callable[[bool], str],
                  what: str) -> str:
    """Run `fetch` (which writes `part` and says whether it appended to bytes already there)
    and `check` (which verifies `part`), then rename `part` to `dest`.

    A resumed download that fails `check` is fetched once more from zero: the bytes it was
    resumed from may belong to another file, and blaming the sha256 for that would point the
    user the wrong way. On failure `part` is removed, except after a resumable https failure,
    whose partial download the next run continues with a Range request."""
    try:
        resumed = bool(fetch())
        try:
            digest = check(resumed)
        except _Mismatch:
            if not resumed:
                raise
            log.warning("%s: the resumed download failed verification; downloading it again from the start", what)
            part.unlink(missing_ok=True)
            digest = check(bool(fetch()))
    except _ResumableFailure:
        raise
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return digest


def archives_from_checksums(sums_file: Path) -> dict[str, dict]:
    """data.archives entries for the zips listed in a `sha256sum`-style file beside them."""
    sums_file = Path(sums_file).resolve()
    entries: dict[str, dict] = {}
    for number, line in enumerate(sums_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        digest, _, filename = line.partition("  ")
        path = sums_file.parent / filename.strip().lstrip("*")
        if not filename.strip() or not path.is_file():
            raise FerflowError(f"{sums_file}:{number}: expected '<sha256>  <file>' naming a file beside it")
        entries[path.stem] = {"uri": path.as_uri(), "sha256": digest.strip(), "size": path.stat().st_size}
    return entries


def verify_file(path: Path, spec: ArchiveSpec, chunk: int = 1 << 20) -> None:
    """Check an archive already on disk against params before a later stage trusts it."""
    if not _already_verified(Path(path), spec, chunk):
        raise FerflowError(
            f"{path}: does not match sha256 {spec.sha256} of '{spec.name}' in data.archives; "
            "run `ferflow fetch` to replace it"
        )


# ---------------------------------------------------------------------------- verification


# Said when even the fresh retry had to resume after a dropped connection: then the source
# most likely changed while it was fetched, not for good.
_RESUMED_HINT = ("It was pieced together from resumed partial downloads; the source may have changed meanwhile, "
                 "try again")


def _verify(path: Path, spec: ArchiveSpec, chunk: int, resumed: bool = False) -> str:
    actual_size = path.stat().st_size
    where = redact_uri(spec.uri)
    if spec.size is not None and actual_size != spec.size:
        hint = _RESUMED_HINT if resumed else f"Check the uri and size of '{spec.name}' in data.archives (params.yaml)"
        raise _Mismatch(
            f"{spec.name}: {where} gave {actual_size} bytes, expected size {spec.size}; the download "
            f"was removed. {hint}"
        )
    digest = sha256_file(path, chunk)
    if digest != spec.sha256:
        hint = _RESUMED_HINT if resumed else (
            f"If the source changed on purpose, update sha256 of '{spec.name}' in data.archives (params.yaml)")
        raise _Mismatch(
            f"{spec.name}: sha256 mismatch for {where}: expected {spec.sha256}, got {digest} "
            f"({actual_size} bytes); the download was removed. {hint}"
        )
    return digest


def _stamp_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.verified")


def _already_verified(dest: Path, spec: ArchiveSpec, chunk: int) -> bool:
    st = dest.stat()
    if spec.size is not None and st.st_size != spec.size:
        return False
    try:
        stamp = json.loads(_stamp_path(dest).read_text(encoding="utf-8"))
        if stamp["size"] == st.st_size and stamp["mtime_ns"] == st.st_mtime_ns:
            return stamp["sha256"] == spec.sha256
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no usable stamp: hash the file
    digest = sha256_file(dest, chunk)
    _write_stamp(dest, digest)
    return digest == spec.sha256


def _write_stamp(dest: Path, digest: str) -> None:
    st = dest.stat()
    stamp = _stamp_path(dest)
    atomic_write_text(stamp, json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}))


# ---------------------------------------------------------------------------- dispatch

# A fetcher writes the whole file to `part`; it returns True when it appended to bytes that
# were already there (an http Range resume), which _through_part must know.
Fetcher = Callable[[str, Path, Optional[int], FetchSettings], Optional[bool]]


def _pick_fetcher(uri: str) -> Fetcher:
    scheme = urllib.parse.urlsplit(uri).scheme.lower() if "://" in uri or uri.startswith("file:") else ""
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
                _sleep(delay)
            try:
                # The last attempt tells: one that restarted from zero wiped an earlier resume.
                return _http_attempt(session, uri, part, size, settings)
            except _Transient as exc:
                reason = str(exc)
    message = f"could not download {redact_uri(uri)} after {attempts} attempts: {reason}"
    if _size(part):
        raise _ResumableFailure(f"{message} (partial file {part} kept; the next run resumes it)")
    raise FerflowError(f"{message}; check the uri and the network, or raise fetch.retries")


def _sleep(seconds: float) -> None:
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
    source = local_path(uri)
    if not source.is_file():
        raise FerflowError(
            f"source archive not found: {source.resolve()} (from uri {uri!r}; relative paths are "
            f"resolved against {Path.cwd()}). Check the uri in data.archives (params.yaml)"
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
