"""Recorded digests: the sha256 of a local source that params leave unpinned.

A local zip or folder may be named in `data.archives` without a sha256 (a user's own
photos). The first `ferflow fetch` of it records the digest of what it fetched (for a folder:
of the deterministic zip it packed) in `<data.raw_dir>/<name>.sha256.json`, beside the zip;
every later fetch computes it again and fails if the source changed, until the change is
accepted (the record deleted, or the new digest pinned in params).

The stages after fetch read an archive's digest as `spec.sha256` (prepare's check and
report, lineage tags, recipe hashes, dvc.lock pins, the compiled pipeline):
`with_recorded_digests` gives them params with the recorded digests filled in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from ferflow import layout
from ferflow.config import ArchiveSpec, Params
from ferflow.config.base import sha256_digest
from ferflow.errors import FerflowError
from ferflow.fileio import atomic_write_json
from ferflow.redact import redact_uri

def recorded_sha256(raw_dir: Path, name: str) -> Optional[str]:
    """The digest recorded for archive `name`, or None when there is no record."""
    path = layout.digest_record(raw_dir, name)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise FerflowError(f"{path}: unreadable digest record ({exc}); delete it and run "
                           f"`ferflow fetch --dataset {name}` again") from None
    try:
        return sha256_digest(record["sha256"])
    except (TypeError, KeyError, AttributeError, ValueError):
        raise FerflowError(f"{path}: no sha256 in this digest record; delete it and run "
                           f"`ferflow fetch --dataset {name}` again") from None


def record(raw_dir: Path, spec: ArchiveSpec, digest: str, size: int) -> Path:
    path = layout.digest_record(raw_dir, spec.name)
    atomic_write_json(path, {"name": spec.name, "uri": redact_uri(spec.uri), "sha256": digest, "size": size})
    return path


def changed_error(raw_dir: Path, spec: ArchiveSpec, recorded: str, digest: str) -> FerflowError:
    """One line: which archive changed, both digests, and how to accept the new content."""
    return FerflowError(
        f"{spec.name}: {redact_uri(spec.uri)} changed since its digest was recorded: recorded sha256 {recorded}, "
        f"now {digest}. To accept the new content, delete {layout.digest_record(raw_dir, spec.name)} (or set "
        f"data.archives.{spec.name}.sha256={digest}) and run `ferflow fetch --dataset {spec.name}` again"
    )


def with_recorded_digests(params: Params, datasets: Iterable[str] = ()) -> Params:
    """`params` whose archives without a sha256 carry the digest `ferflow fetch` recorded
    for them (unchanged params when every archive has one). Each of `datasets` (archives or
    unions) must then have its digest: ConfigError naming the one that does not, saying to
    fetch it first. Archives neither named nor recorded keep sha256 None."""
    data = params.data
    filled = {}
    for name, source in data.archives.items():
        digest = None if source.sha256 else recorded_sha256(data.raw_dir, name)
        if digest:
            filled[name] = source.model_copy(update={"sha256": digest})
    if filled:
        data = data.model_copy(update={"archives": {**data.archives, **filled}})
        params = params.model_copy(update={"data": data})
    for name in datasets:
        data.content_sha256(name)  # raises for a member with no digest yet
    return params
