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

Local sources (a path or file://; a zip, or a folder packed into one by ferflow.data.packing)
are held to their sha256 only: `size` is not checked for them (it serves remote downloads).
One without a sha256 in params is read on every fetch and held to the digest recorded at
its first fetch (ferflow.data.digests); remote sources always need a sha256 (params refuse
them otherwise).

The per-scheme transfers (retries, Range resume, gdown, boto3) are in ferflow.data.fetchers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from ferflow import layout
from ferflow.config import ArchiveSpec, FetchSettings, is_local_uri
from ferflow.data import digests
from ferflow.data.fetchers import ResumableFailure, fetcher_for, local_path
from ferflow.errors import FerflowError
from ferflow.fileio import atomic_write_text, sha256_file
from ferflow.redact import is_redacted, redact_uri

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchResult:
    name: str
    path: Path
    sha256: str
    size: int
    downloaded: bool  # False when an already-verified file was reused
    from_dvc_remote: bool = False  # the bytes came from the DVC remote by md5, not the params URI
    record: Optional[Path] = None  # unpinned local source: where its digest is recorded (ferflow.data.digests)


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
    dest = layout.raw_archive(dest_dir, spec.name)
    fetcher = fetcher_for(spec.uri)  # a bad uri is reported even when the file is present
    spec = _local_without_size(spec)
    if spec.sha256 is None:
        return _fetch_unpinned(spec, dest, fetcher, settings)
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


def _local_without_size(spec: ArchiveSpec) -> ArchiveSpec:
    """A local source is held to its sha256 alone: `size` serves remote downloads (resume
    bounds, the pipeline's disks), and a size left in params from the archive a --set uri
    replaced would only fail a good file."""
    if spec.size is None or not is_local_uri(spec.uri):
        return spec
    log.debug("%s: size %d in params is not checked for a local source", spec.name, spec.size)
    return spec.model_copy(update={"size": None})


def _fetch_unpinned(spec: ArchiveSpec, dest: Path, fetcher, settings: FetchSettings) -> FetchResult:
    """A local source without a sha256 in params: fetched (copied, or packed from a folder)
    on every run, since only its content says what it is, and held to the digest recorded at
    its first fetch (ferflow.data.digests), which it records when there is none."""
    recorded = digests.recorded_sha256(dest.parent, spec.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.part")
    try:
        fetcher(spec.uri, part, None, settings)
        digest = sha256_file(part, settings.chunk_bytes)
        if recorded is not None and digest != recorded:
            raise digests.changed_error(dest.parent, spec, recorded, digest)
        pinned = spec.model_copy(update={"sha256": digest})
        reused = dest.is_file() and _already_verified(dest, pinned, settings.chunk_bytes)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if reused:
        part.unlink()
    else:
        os.replace(part, dest)
        _write_stamp(dest, digest)
    size = dest.stat().st_size
    if recorded is None:
        where = digests.record(dest.parent, spec, digest, size)
        log.info("%s: no sha256 in params; recorded the content's sha256 %s in %s", spec.name, digest, where)
    return FetchResult(spec.name, dest, digest, size, downloaded=not reused,
                       record=layout.digest_record(dest.parent, spec.name))


def download(uri: str, dest: Path, settings: FetchSettings, expected_sha256: str | None = None) -> str:
    """Fetch any file (model weights, ...) to `dest` through `<dest>.part`; return its sha256.

    Same schemes, retries, resume and cleanup as fetch_archive; `dest` appears only once
    complete and, when `expected_sha256` is given, verified.
    """
    dest = Path(dest)
    fetcher = fetcher_for(uri)
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
                f"({part.stat().st_size} bytes); the download was removed. {hint}"
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
    except ResumableFailure:
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
    """Check an archive already on disk against params (or the digest recorded for an
    unpinned local source: ferflow.data.digests.with_recorded_digests) before a stage trusts it."""
    expected = spec.require_sha256()
    if not _already_verified(Path(path), _local_without_size(spec), chunk):
        raise FerflowError(
            f"{path}: does not match sha256 {expected} of '{spec.name}' in data.archives; "
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
