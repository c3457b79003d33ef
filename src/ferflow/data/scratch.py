"""Temporary folders of prepare and union runs, and the leftovers of runs that were killed.

A run killed with SIGKILL (OOM killer, cancelled job) runs no cleanup, and its temporary
folder holds a dataset's worth of caches. Each temporary folder's name says who owns it:
`.<dataset>.<kind>-<host tag>-<pid>-<random>`; a later run removes those whose owner is
gone (`sweep_stale`). The host tag (`host_tag`: host name and pid namespace) keeps a run
from judging pids of another machine or container that shares the folder: their leftovers
are left alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_SCRATCH = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|members|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-.+")


def host_tag() -> str:
    """This host's part of a temporary folder's name: 8 hex digits of the host name and pid namespace."""
    ident = socket.gethostname()
    try:
        ident += os.readlink("/proc/self/ns/pid")
    except OSError:
        pass  # no /proc: the host name alone
    return hashlib.sha1(ident.encode()).hexdigest()[:8]


def _owner() -> str:
    return f"{host_tag()}-{os.getpid()}"


def scratch_dir(parent: Path, name: str, kind: str = "tmp") -> Path:
    """A new temporary folder in `parent` for `name`, named after this process (see sweep_stale)."""
    return Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-{_owner()}-", dir=parent))


def replace_dir(src: Path, dest: Path) -> None:
    """Swap a finished output into place; the old one is removed only after the swap (a run
    killed in between leaves it as `.<name>.old-…`, which sweep_stale puts back)."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{_owner()}-{os.urandom(4).hex()}")
        os.replace(dest, old)
    os.replace(src, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sweep_stale(parent: Path) -> None:
    """Remove the temporary folders in `parent` of runs on this host that died; a folder of
    a live run (a concurrent prepare) is never touched."""
    host = host_tag()
    for path in sorted(Path(parent).iterdir()):
        found = _SCRATCH.fullmatch(path.name)
        if found is None or found["host"] != host or _alive(int(found["pid"])):
            continue
        dest = path.with_name(found["name"])
        if found["kind"] == "old" and not dest.exists():
            # Killed between the two renames of replace_dir: this is the only output left.
            try:
                os.replace(path, dest)
                log.warning("restored %s, moved aside by an interrupted run (process %s)", dest, found["pid"])
            except OSError:
                pass  # another run got there first; a later sweep removes this copy
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed %s, left by an interrupted run (process %s)", path, found["pid"])


def _alive(pid: int) -> bool:
    """Whether process `pid` may still use its folder; when unsure, yes."""
    if pid <= 0 or pid == os.getpid():
        return True  # never ours to judge (0 would signal our own process group)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a pid beyond this system's range: keep it)
    try:  # a zombie (killed, not yet reaped by its parent) does nothing more
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True
