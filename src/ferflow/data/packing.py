"""Deterministic zips: the same files give the same bytes on every machine, so a folder of
photos gets a content digest like a downloaded archive's sha256.

`pack_folder` turns a local folder (laid out as prepare reads archives: split and class
folders, any wrapping folders) into such a zip; `ferflow fetch` calls it for a folder
given as `data.archives.NAME.uri`, and everything after fetch reads the zip.

What makes the bytes depend on the content alone:

- entries are the files' paths relative to the folder (the folder's own name and location
  are left out), Unicode-normalised (NFC: macOS writes decomposed names), sorted;
- every entry has the same timestamp (1980-01-01), Unix permissions 0644 and is stored
  uncompressed: photos are already compressed, and deflate's output depends on the zlib
  build, which would make the digest depend on the machine;
- empty folders are left out.

Hidden files and folders (a name starting with '.', e.g. `.DS_Store`, `.git`), `__MACOSX`,
`Thumbs.db` and `desktop.ini` are skipped, by the rule prepare applies to zip entries
(ferflow.data.archive.junk_reason), so an OS writing its metadata never changes the digest.

Symbolic links are followed only while they stay inside the folder; one that leads outside
it (or nowhere, or into a loop) is refused, as is anything that is not a regular file or a
folder (a FIFO, a socket, a device).
"""

from __future__ import annotations

import os
import shutil
import unicodedata
import zipfile
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Union

from ferflow.data.archive import junk_reason
from ferflow.errors import FerflowError

ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can hold
_CHUNK = 1 << 20


def write_zip(fh: BinaryIO, entries: Iterable[tuple[str, Union[bytes, Path]]]) -> None:
    """A deterministic zip of `(name, content)` into the seekable `fh`, in the order given:
    content is bytes or a file to copy (read in chunks)."""
    with zipfile.ZipFile(fh, "w") as zf:
        for name, content in entries:
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.create_system = 3  # Unix, so external_attr holds the permissions
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_STORED
            if isinstance(content, bytes):
                zf.writestr(info, content)
                continue
            try:
                info.file_size = content.stat().st_size  # decides zip64 up front, as writestr does
                with open(content, "rb") as src, zf.open(info, "w") as dest:
                    shutil.copyfileobj(src, dest, _CHUNK)
            except OSError as exc:
                raise FerflowError(f"cannot read {content}: {exc.strerror or exc}") from None


def folder_files(folder: Path) -> list[tuple[str, Path]]:
    """The files to pack, as (entry name, path), sorted by entry name; see the module docstring."""
    root = Path(folder)
    if not root.is_dir():
        raise FerflowError(f"{root}: not a folder")
    real_root = os.path.realpath(root)
    found: dict[str, Path] = {}
    for name, path in _walk(root, real_root, root, (), {real_root}):
        if name in found:  # two spellings of one name that NFC makes equal
            raise FerflowError(f"{root}: {found[name]} and {path} have the same name once Unicode-normalised; "
                               "rename one of them")
        found[name] = path
    if not found:
        raise FerflowError(f"{root}: the folder holds no files (hidden files and OS metadata are not counted)")
    return sorted(found.items())


def _walk(root: Path, real_root: str, folder: Path, parts: tuple[str, ...],
          ancestors: set[str]) -> Iterator[tuple[str, Path]]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise FerflowError(f"cannot list {folder}: {exc.strerror or exc}") from None
    for entry in entries:
        path = Path(entry.path)
        try:
            entry.name.encode("utf-8")
        except UnicodeError:  # bytes that are not UTF-8 in the name (os.fsdecode's surrogates)
            raise FerflowError(f"{path!r}: the file name is not valid UTF-8; rename it") from None
        here = (*parts, unicodedata.normalize("NFC", entry.name))
        if junk_reason(here) is not None:
            continue
        real = os.path.realpath(path)
        if entry.is_symlink():
            if os.path.commonpath([real, real_root]) != real_root:
                raise FerflowError(f"{path} is a symbolic link to {real}, outside the folder {root}; "
                                   "copy the file in instead")
            if not os.path.exists(real):
                raise FerflowError(f"{path} is a symbolic link to {real}, which does not exist")
        if entry.is_dir():  # follows a link, which stays inside (checked above)
            if real in ancestors:
                raise FerflowError(f"{path} is a symbolic link to a folder that contains it (a loop)")
            yield from _walk(root, real_root, path, here, ancestors | {real})
        elif entry.is_file():
            yield "/".join(here), path
        else:
            raise FerflowError(f"{path} is not a regular file or folder (a FIFO, socket or device); remove it")


def pack_folder(folder: Path, dest: Path) -> int:
    """Write `folder` as a deterministic zip at `dest`, in place (callers give a temporary
    path and rename it once verified); returns the number of files packed."""
    files = folder_files(folder)
    with open(dest, "wb") as fh:
        write_zip(fh, files)
    return len(files)
