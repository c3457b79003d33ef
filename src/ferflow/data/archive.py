"""Safe zip reading: check every entry before anything is read (paths, types, junk, the
declared size against the cap), then read members straight from the zip with their real
size bounded, so a hostile or broken archive is refused before it can cost disk or memory."""

from __future__ import annotations

import re
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from ferflow.errors import FerflowError

CAP_KEY = "prepare.max_uncompressed_bytes"
_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")
_SEPARATORS = re.compile(r"[\\/]")
_BAD_TYPES = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
}
_JUNK_NAMES = {"thumbs.db": "Windows thumbnail cache", "desktop.ini": "Windows folder settings"}
_UNSAFE_FIX = "refusing to read any of it; re-fetch the archive from a trusted source"
# Inflated a bounded piece at a time by zipfile (decompress with max_length); bzip2 and lzma
# are inflated without a limit, where ~200 bytes can hold 100 MB, so they are refused.
_BOUNDED_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
_METHOD_NAMES = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma", 9: "deflate64"}


@dataclass(frozen=True)
class _Member:
    info: zipfile.ZipInfo
    path: str  # normalised posix path relative to the root
    is_dir: bool


@dataclass(frozen=True)
class ArchiveListing:
    """A validated archive, read in place (nothing is extracted to disk)."""

    path: Path
    files: list[str]  # normalised posix paths, sorted
    skipped: list[dict]  # junk entries left out: {"path", "reason"}; never directories
    dirs: list[str]  # every directory (explicit or implied), sorted
    declared_bytes: int
    entry_names: dict[str, str]  # normalised path -> name inside the zip


def inspect_archive(zip_path: Path, max_uncompressed_bytes: int) -> ArchiveListing:
    """Check every entry (paths, types, junk, compression, the declared total against the
    cap) and list the files; write nothing.

    Reading members straight from the zip afterwards (`read_member`) is safe: no path is
    ever created from an entry name, and no member yields more than its declared size, so
    the declared total bounds what is inflated.
    """
    zip_path = Path(zip_path)
    with _open_zip(zip_path) as zf:
        members, skipped = _plan(zf, str(zip_path), max_uncompressed_bytes)
    files = [m for m in members if not m.is_dir]
    return ArchiveListing(
        path=zip_path,
        files=sorted(m.path for m in files),
        skipped=skipped,
        dirs=_all_dirs(members),
        declared_bytes=sum(m.info.file_size for m in files),
        entry_names={m.path: m.info.filename for m in files},
    )


def read_member(zf: zipfile.ZipFile, listing: ArchiveListing, path: str) -> bytes:
    """One validated member's bytes; corruption becomes a FerflowError naming the entry.

    Read a chunk at a time, never with `zf.read`: a one-shot read inflates the whole member
    before zipfile cuts it to the declared size, so an entry whose header under-declares
    its size (a zip bomb) would take all the memory it expands to, whatever the cap.
    """
    try:
        info = zf.getinfo(listing.entry_names[path])
        chunks, total = [], 0
        with zf.open(info) as src:
            while chunk := src.read(_CHUNK):
                total += len(chunk)
                if total > info.file_size:  # zipfile stops there itself; this keeps the bound if it ever does not
                    raise FerflowError(
                        f"{listing.path}: entry {path!r} expands past its declared {info.file_size:,} bytes; "
                        "the archive is corrupt or a zip bomb; re-fetch it"
                    )
                chunks.append(chunk)
        return b"".join(chunks)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise FerflowError(f"{listing.path}: entry {path!r} is corrupt ({exc}); re-fetch the archive") from None
    except (NotImplementedError, RuntimeError) as exc:
        raise FerflowError(f"{listing.path}: entry {path!r} cannot be read ({exc})") from None


def open_zip(zip_path: Path) -> zipfile.ZipFile:
    return _open_zip(Path(zip_path))


# ---------------------------------------------------------------------------- checking


def _open_zip(zip_path: Path) -> zipfile.ZipFile:
    if not zip_path.is_file():
        raise FerflowError(f"{zip_path}: archive not found (or not a file); fetch it first")
    try:
        return zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        raise FerflowError(f"{zip_path} is not a valid zip archive ({exc}); re-fetch it") from None


def _plan(zf: zipfile.ZipFile, archive: str, cap: int) -> tuple[list[_Member], list[dict]]:
    """Validate every entry before anything is read; return the members and the junk."""
    members: list[_Member] = []
    skipped: list[dict] = []
    for info in zf.infolist():
        parts = _safe_parts(info.filename, archive)
        is_dir = _is_dir(info, archive)
        if not parts:
            continue  # "./" and the like name the root itself
        reason = junk_reason(parts)
        if reason is not None:
            if not is_dir:
                skipped.append({"path": info.filename, "reason": reason})
            continue
        if not is_dir and info.flag_bits & 0x1:
            raise FerflowError(
                f"{archive}: entry {info.filename!r} is encrypted (password-protected); "
                "use an unencrypted copy of the archive"
            )
        if not is_dir and info.compress_type not in _BOUNDED_METHODS:
            method = _METHOD_NAMES.get(info.compress_type, f"method {info.compress_type}")
            raise FerflowError(
                f"{archive}: entry {info.filename!r} is compressed with {method}, whose expansion cannot be "
                "bounded while reading; repack the archive with deflate (the zip default) or store"
            )
        members.append(_Member(info, "/".join(parts), is_dir))
    _check_collisions(members, archive)
    declared = sum(m.info.file_size for m in members if not m.is_dir)
    if declared > cap:
        raise FerflowError(
            f"{archive}: declares {declared:,} bytes uncompressed, over the cap of {cap:,} bytes "
            f"({CAP_KEY}); raise {CAP_KEY} if the archive is trusted, otherwise re-fetch it"
        )
    return members, skipped


def _safe_parts(name: str, archive: str) -> tuple[str, ...]:
    # Backslashes count as separators: Windows tools write them, and `..\\x` must not slip through.
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise FerflowError(f"{archive}: entry {name!r} has an absolute path; {_UNSAFE_FIX}")
    parts = tuple(p for p in _SEPARATORS.split(name) if p not in ("", "."))
    if ".." in parts:
        raise FerflowError(
            f"{archive}: entry {name!r} points outside the extraction folder ('..'); {_UNSAFE_FIX}"
        )
    return parts


def _is_dir(info: zipfile.ZipInfo, archive: str) -> bool:
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind in _BAD_TYPES:
        raise FerflowError(
            f"{archive}: entry {info.filename!r} is {_BAD_TYPES[kind]}, not a regular file; {_UNSAFE_FIX}"
        )
    return info.is_dir() or kind == stat.S_IFDIR


def junk_reason(parts: tuple[str, ...]) -> str | None:
    """Why an entry (its path's parts) is OS junk to skip, or None: resource forks, folder
    metadata, hidden files, Windows thumbnails. Also what ferflow.data.packing leaves out."""
    if "__MACOSX" in parts:
        return "macOS resource fork"
    if parts[-1] == ".DS_Store":
        return "macOS folder metadata"
    if any(p.startswith(".") for p in parts):
        return "hidden file"
    return _JUNK_NAMES.get(parts[-1].lower())


def _check_collisions(members: list[_Member], archive: str) -> None:
    files: set[str] = set()
    for m in members:
        if not m.is_dir:
            if m.path in files:
                raise FerflowError(
                    f"{archive}: entry {m.path!r} appears more than once, so which copy is meant is "
                    "ambiguous; re-fetch the archive or rebuild it without duplicates"
                )
            files.add(m.path)
    clash = sorted(files.intersection(_all_dirs(members)))
    if clash:
        raise FerflowError(
            f"{archive}: entry {clash[0]!r} is both a file and a folder; re-fetch the archive"
        )


def _all_dirs(members: list[_Member]) -> list[str]:
    found: set[str] = set()
    for m in members:
        parts = m.path.split("/")
        upto = len(parts) if m.is_dir else len(parts) - 1
        found.update("/".join(parts[:i]) for i in range(1, upto + 1))
    return sorted(found)
