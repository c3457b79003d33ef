"""File I/O with one guarantee: a file ferflow writes is either the old one or the whole new
one, after a crash or a concurrent writer. Content goes to a uniquely named temp file beside
the target (same filesystem, so the rename is atomic), is fsynced, renamed over the target,
and the folder is fsynced so the rename itself survives a power loss.

Also here: hashing a file, the one hasher (sha256 for data and weights, md5 for DVC pins).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ferflow.errors import FerflowError


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform can open a folder; the rename is done either way
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path | str, suffix: str = "") -> Iterator[Path]:
    """A fresh temp path beside `path` for a writer that takes a file name (PIL, safetensors,
    zipfile...). When the block ends normally the file is fsynced and renamed over `path`;
    on an error it is removed and `path` is untouched. `suffix` keeps writers that look at
    the extension happy (e.g. ".yaml")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    except OSError as exc:
        raise FerflowError(f"cannot write {path}: {exc.strerror or exc}") from None


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any, sort_keys: bool = True) -> None:
    """Indented JSON; keys sorted unless the order is part of the meaning."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")


def file_digest(path: Path | str, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    return file_digest(path, "sha256", chunk)
