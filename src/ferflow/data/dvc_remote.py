"""Archives pinned by dvc.lock, fetched from the DVC remote by content hash.

A KFP task has no DVC workspace. The compiled pipeline carries the `fetch@<name>` entries
of dvc.lock and the remote's URL, and this module turns each pinned md5 into the object's
address in the remote: `<remote>/files/md5/<2 hex>/<30 hex>` for DVC 3 lock entries
(`hash: md5`), `<remote>/<2 hex>/<30 hex>` for DVC 2 ones. The object is downloaded with the
ordinary `sources.download` (boto3 for s3://, with the standard AWS environment) and must
match both the sha256 in params and the md5 in the lock, so a pipeline run trains on the
archives of the commit it was compiled from.

An archive without a lock entry is fetched from its params URI as usual; a pinned object
that cannot be downloaded falls back to the params URI too, and the md5 check still holds
that copy to the lock.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import yaml

from ferflow.config import ArchiveSpec, FetchSettings
from ferflow.data.sources import download
from ferflow.fileio import file_digest
from ferflow.redact import redact_uri
from ferflow.errors import FerflowError

log = logging.getLogger(__name__)

FETCH_STAGE = "fetch@"  # dvc.yaml's foreach stage over data.archives
_MD5 = re.compile(r"^[0-9a-f]{32}$")

Lock = Union[str, Mapping, None]  # dvc.lock as text or parsed (a KFP struct parameter)


@dataclass(frozen=True)
class DvcPin:
    """One archive as dvc.lock recorded it (the output of stage `fetch@<name>`)."""

    name: str
    md5: str
    size: Optional[int]
    legacy: bool  # DVC 2.x entry: objects live at <remote>/<2>/<30>, not under files/md5/


def fetch_entries(lock: Lock) -> dict:
    """The `fetch@*` stages of a dvc.lock, as a lock document of their own ({} if none).

    What a compiled pipeline embeds: the archives' hashes, not the whole training DAG's.
    """
    tree = _load(lock)
    stages = {k: v for k, v in (tree.get("stages") or {}).items() if k.startswith(FETCH_STAGE)}
    return {"schema": tree.get("schema", "2.0"), "stages": stages} if stages else {}


def read_pins(lock: Lock) -> dict[str, DvcPin]:
    """Archive name -> pin, from the `fetch@<name>` entries of a dvc.lock."""
    pins = {}
    for stage, entry in (_load(lock).get("stages") or {}).items():
        if not stage.startswith(FETCH_STAGE) or not isinstance(entry, dict):
            continue
        name = stage[len(FETCH_STAGE):]
        for out in entry.get("outs") or []:
            md5 = str(out.get("md5", "")).lower() if isinstance(out, dict) else ""
            if _MD5.match(md5) and str(out.get("path", "")).endswith(f"{name}.zip"):
                pins[name] = DvcPin(name, md5, out.get("size"), legacy=out.get("hash") != "md5")
    return pins


def object_uri(remote: str, pin: DvcPin) -> str:
    """Where DVC stores the pinned file in a remote (DVC 3 layout unless the pin is legacy)."""
    if not remote.strip():
        raise FerflowError(f"{pin.name}: no DVC remote URL to fetch md5 {pin.md5} from; set the `dvc_remote` "
                           "pipeline parameter or compile with --dvc-remote")
    prefix = remote.rstrip("/") + ("/" if pin.legacy else "/files/md5/")
    return f"{prefix}{pin.md5[:2]}/{pin.md5[2:]}"


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    return file_digest(path, "md5", chunk)  # DVC's content address, not a security check


def fetch_pinned(specs: Iterable[ArchiveSpec], lock: Lock, remote: str, dest_dir: Path,
                 settings: FetchSettings) -> list[str]:
    """Download each pinned archive from the DVC remote into `<dest_dir>/<name>.zip`,
    verified against its params sha256; return the names that came from the remote.

    A pinned object that cannot be fetched (not pushed, no credentials, other content)
    is logged and left to the params URI; `check_pins` holds either copy to the lock.
    """
    pins = read_pins(lock)
    fetched = []
    for spec in specs:
        pin = pins.get(spec.name)
        if pin is None:
            continue
        dest = Path(dest_dir) / f"{spec.name}.zip"
        if dest.is_file() and md5_file(dest, settings.chunk_bytes) == pin.md5:
            continue  # already the pinned content (a retried task)
        uri = object_uri(remote, pin)
        try:
            download(uri, dest, settings, expected_sha256=spec.sha256)
        except FerflowError as exc:
            log.warning("%s: pinned DVC object %s not fetched (%s); using %s", spec.name, redact_uri(uri), exc,
                        redact_uri(spec.uri))
            continue
        log.info("%s: fetched md5 %s from the DVC remote", spec.name, pin.md5)
        fetched.append(spec.name)
    return fetched


def check_pins(specs: Iterable[ArchiveSpec], lock: Lock, dest_dir: Path, chunk: int = 1 << 20) -> None:
    """Every pinned archive in dest_dir must have the md5 dvc.lock recorded."""
    pins = read_pins(lock)
    for spec in specs:
        pin = pins.get(spec.name)
        if pin is None:
            continue
        path = Path(dest_dir) / f"{spec.name}.zip"
        actual = md5_file(path, chunk)
        if actual != pin.md5:
            raise FerflowError(
                f"{spec.name}: {path} has md5 {actual}, but dvc.lock pins md5 {pin.md5} ({FETCH_STAGE}{spec.name}); "
                "params.yaml and dvc.lock disagree: run `dvc repro` and commit dvc.lock, then recompile the "
                "pipeline (`ferflow pipeline compile`)"
            )


def _load(lock: Lock) -> dict:
    if lock is None or isinstance(lock, Mapping):
        return dict(lock or {})
    try:
        tree = yaml.safe_load(lock) if lock.strip() else {}
    except yaml.YAMLError as exc:
        raise FerflowError(f"dvc.lock: not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise FerflowError(f"dvc.lock: expected a mapping with `stages`, got {type(tree).__name__}")
    return tree
