"""Safe zip extraction: check every entry first, then stream into a temporary sibling
directory and rename it into place, so a hostile or broken archive leaves nothing behind."""

from __future__ import annotations

import re
import secrets
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass, field
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
_UNSAFE_FIX = "refusing to extract any of it; re-fetch the archive from a trusted source"


@dataclass(frozen=True)
class ExtractResult:
    root: Path  # the directory everything was extracted into
    files: list[str]  # extracted files, relative to root, posix style, sorted
    skipped: list[dict]  # junk entries not extracted: {"path", "reason"}; never directories
    uncompressed_bytes: int
    dirs: list[str] = field(default_factory=list)  # every extracted directory (explicit or implied), sorted


@dataclass(frozen=True)
class _Member:
    info: zipfile.ZipInfo
    path: str  # normalised posix path relative to the root
    is_dir: bool


@dataclass(frozen=True)
class ArchiveListing:
    """A validated archive, read in place: what `safe_extract` would write, without writing."""

    path: Path
    files: list[str]  # normalised posix paths, sorted
    skipped: list[dict]
    dirs: list[str]
    declared_bytes: int
    entry_names: dict[str, str]  # normalised path -> name inside the zip


def inspect_archive(zip_path: Path, max_uncompressed_bytes: int) -> ArchiveListing:
    """Apply every check of `safe_extract` (paths, types, junk, cap) but write nothing.

    Reading members straight from the zip afterwards is safe: no path is ever created
    from an entry name, and zipfile never reads past a member's declared size (a lying
    header fails its CRC check instead), so the declared total bounds what is inflated.
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
    """One validated member's bytes; corruption becomes a FerflowError naming the entry."""
    try:
        return zf.read(listing.entry_names[path])
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise FerflowError(f"{listing.path}: entry {path!r} is corrupt ({exc}); re-fetch the archive") from None
    except (NotImplementedError, RuntimeError) as exc:
        raise FerflowError(f"{listing.path}: entry {path!r} cannot be read ({exc})") from None


def open_zip(zip_path: Path) -> zipfile.ZipFile:
    return _open_zip(Path(zip_path))


def safe_extract(zip_path: Path, dest: Path, max_uncompressed_bytes: int) -> ExtractResult:
    """Extract `zip_path` into `dest` all-or-nothing; raise FerflowError on anything unsafe."""
    zip_path, dest = Path(zip_path), Path(dest)
    with _open_zip(zip_path) as zf:
        members, skipped = _plan(zf, str(zip_path), max_uncompressed_bytes)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp-{secrets.token_hex(6)}"
        tmp.mkdir()
        try:
            written = _extract(zf, members, tmp, str(zip_path), max_uncompressed_bytes)
            _install(tmp, dest)
        except BaseException:
            # BaseException too: an interrupted run must not leave a half-written tree.
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    files = sorted(m.path for m in members if not m.is_dir)
    return ExtractResult(dest, files, skipped, written, _all_dirs(members))


# ---------------------------------------------------------------------------- checking


def _open_zip(zip_path: Path) -> zipfile.ZipFile:
    if not zip_path.is_file():
        raise FerflowError(f"{zip_path}: archive not found (or not a file); fetch it first")
    try:
        return zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        raise FerflowError(f"{zip_path} is not a valid zip archive ({exc}); re-fetch it") from None


def _plan(zf: zipfile.ZipFile, archive: str, cap: int) -> tuple[list[_Member], list[dict]]:
    """Validate every entry before anything is written; return what to extract and the junk."""
    members: list[_Member] = []
    skipped: list[dict] = []
    for info in zf.infolist():
        parts = _safe_parts(info.filename, archive)
        is_dir = _is_dir(info, archive)
        if not parts:
            continue  # "./" and the like name the root itself
        reason = _junk_reason(parts)
        if reason is not None:
            if not is_dir:
                skipped.append({"path": info.filename, "reason": reason})
            continue
        if not is_dir and info.flag_bits & 0x1:
            raise FerflowError(
                f"{archive}: entry {info.filename!r} is encrypted (password-protected); "
                "use an unencrypted copy of the archive"
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


def _junk_reason(parts: tuple[str, ...]) -> str | None:
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


# ---------------------------------------------------------------------------- writing


class _CappedWriter:
    """File wrapper counting real bytes, so a header that understates sizes cannot beat the cap."""

    def __init__(self, fh, budget: int, on_over):
        self._fh, self.budget, self.written, self._on_over = fh, budget, 0, on_over

    def write(self, data: bytes) -> int:
        self.written += len(data)
        if self.written > self.budget:
            self._on_over()
        return self._fh.write(data)


def _extract(zf: zipfile.ZipFile, members: list[_Member], root: Path, archive: str, cap: int) -> int:
    total = 0
    for m in sorted(members, key=lambda m: m.path):
        target = root.joinpath(*m.path.split("/"))
        if m.is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        total += _extract_one(zf, m, target, archive, cap, cap - total)
    return total


def _extract_one(zf: zipfile.ZipFile, m: _Member, target: Path, archive: str, cap: int, budget: int) -> int:
    def over() -> None:
        raise FerflowError(
            f"{archive}: entry {m.path!r} expands past the cap of {cap:,} bytes ({CAP_KEY}) although "
            "the headers declare less; the archive is corrupt or a zip bomb; re-fetch it"
        )

    try:
        with zf.open(m.info) as src, open(target, "xb") as fh:
            writer = _CappedWriter(fh, budget, over)
            shutil.copyfileobj(src, writer, _CHUNK)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise FerflowError(f"{archive}: entry {m.path!r} is corrupt ({exc}); re-fetch the archive") from None
    except NotImplementedError as exc:
        raise FerflowError(
            f"{archive}: entry {m.path!r} uses an unsupported compression method ({exc}); "
            "repack the archive with deflate or store"
        ) from None
    except RuntimeError as exc:  # zipfile's signal for encrypted data it cannot read
        raise FerflowError(f"{archive}: entry {m.path!r} cannot be read ({exc})") from None
    except OSError as exc:
        raise FerflowError(f"{archive}: could not write {target} ({exc}); check free disk space") from None
    return writer.written


def _install(tmp: Path, dest: Path) -> None:
    """Rename `tmp` to `dest`; an existing `dest` is replaced only once the new tree is complete."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.parent / f".{dest.name}.old-{secrets.token_hex(6)}"
        dest.rename(old)
    try:
        tmp.rename(dest)
    except BaseException:
        if old is not None:
            old.rename(dest)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
