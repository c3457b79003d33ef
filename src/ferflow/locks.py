"""Inter-process file locks for jobs that share local state (an embedded MLflow store).

The OS lock (flock) dies with its process, so a killed job never leaves a stale lock (the
empty lock file stays; it is safe to delete when no job runs). A lock only spans what
shares the file system with working flock: not a way to coordinate jobs on different hosts.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ferflow.errors import FerflowError


@contextmanager
def file_lock(path: Path, what: str, timeout_s: float = 600.0) -> Iterator[None]:
    """Hold the lock file `path` (created, with its folder) while the block runs.

    `what` names the guarded work in the error raised when another job keeps the lock
    longer than `timeout_s`.
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FerflowError(f"{path}: cannot create the lock for {what} ({exc.strerror or exc})") from None
    # A new lock object (own descriptor) per call: threads of one process exclude each other too.
    lock = FileLock(str(path), timeout=timeout_s)
    try:
        lock.acquire()
    except Timeout:
        raise FerflowError(
            f"{path}: another job held this lock for {what} over {timeout_s:g} s; wait for it to finish "
            "(the lock frees itself when that process exits)"
        ) from None
    except OSError as exc:
        raise FerflowError(f"{path}: cannot lock for {what} ({exc.strerror or exc})") from None
    try:
        yield
    finally:
        lock.release()


def lock_name(*parts: str) -> str:
    """A short file-name-safe name for a lock keyed by `parts` (any text)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", parts[0])[:40] if parts else "lock"
    digest = hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:16]
    return f"{readable}-{digest}.lock"
