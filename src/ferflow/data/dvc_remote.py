"""Archives pinned by dvc.lock: fetched from the DVC remote by content hash, and held to it.

One fetch for `ferflow fetch` (the dvc.yaml stage) and the KFP fetch task: `fetch_archives`.
A `fetch@<name>` entry of dvc.lock pins an archive's md5 together with the params it was
recorded for. A pin holds while those params still give the archive's sha256; a pin recorded
for another sha256 is stale (the lock of a `dvc repro` that is changing it, or a pipeline run
given other `archives`) and is set aside with a log line.

A holding pin is fetched from the DVC remote when one is given: the object at
`<remote>/files/md5/<2 hex>/<30 hex>` for DVC 3 entries (`hash: md5`), `<remote>/<2 hex>/<30 hex>`
for DVC 2 ones, downloaded with the ordinary `sources.download` (boto3 for s3://, with the
standard AWS environment). An object that cannot be fetched falls back to the params URI.
Either way the archive must match both its params sha256 and the pinned md5.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import yaml

from ferflow import layout
from ferflow.config import ArchiveSpec, FetchSettings
from ferflow.data.sources import FetchResult, download, fetch_archive
from ferflow.fileio import file_digest
from ferflow.redact import redact_uri
from ferflow.errors import FerflowError

log = logging.getLogger(__name__)

FETCH_STAGE = "fetch@"  # dvc.yaml's foreach stage over data.archives
_MD5 = re.compile(r"^[0-9a-f]{32}$")

# dvc.lock as a file, its text, or parsed (a KFP struct parameter); an absent file is no lock.
Lock = Union[os.PathLike, str, Mapping, None]


@dataclass(frozen=True)
class DvcPin:
    """One archive as dvc.lock recorded it (the output of stage `fetch@<name>`)."""

    name: str
    md5: str
    size: Optional[int]
    legacy: bool  # DVC 2.x entry: objects live at <remote>/<2>/<30>, not under files/md5/
    sha256: Optional[str] = None  # the params sha256 it was recorded for (None: not recorded)


def fetch_entries(lock: Lock, specs: Optional[Iterable[ArchiveSpec]] = None) -> dict:
    """The pins of a dvc.lock as a lock document of their own ({} if none): per `fetch@*`
    entry its outs and the sha256 it was recorded for, nothing else (the recorded params
    also hold URIs, which may carry credentials). With `specs`, only the pins that hold.

    What a compiled pipeline embeds: the archives' hashes, not the whole training DAG's.
    """
    tree = _load(lock)
    pins = read_pins(tree) if specs is None else holding_pins(specs, tree)
    stages = {}
    for name, pin in pins.items():
        out = {"path": layout.archive_name(name), "md5": pin.md5, **({"hash": "md5"} if not pin.legacy else {})}
        if pin.size is not None:
            out["size"] = pin.size
        entry: dict = {"outs": [out]}
        if pin.sha256:
            entry["params"] = {"params.yaml": {"data.archives": {name: {"sha256": pin.sha256}}}}
        stages[FETCH_STAGE + name] = entry
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
            if _MD5.match(md5) and str(out.get("path", "")).endswith(layout.archive_name(name)):
                pins[name] = DvcPin(name, md5, out.get("size"), legacy=out.get("hash") != "md5",
                                    sha256=_recorded_sha256(entry, name))
    return pins


def _recorded_sha256(entry: Mapping, name: str) -> Optional[str]:
    """The archive's sha256 among the params DVC recorded for the stage (any params file)."""
    for values in (entry.get("params") or {}).values():
        archive = ((values or {}).get("data.archives") or {}).get(name) if isinstance(values, Mapping) else None
        if isinstance(archive, Mapping) and archive.get("sha256"):
            return str(archive["sha256"]).lower()
    return None


def holding_pins(specs: Iterable[ArchiveSpec], lock: Lock) -> dict[str, DvcPin]:
    """The pins of these archives that hold: recorded for the sha256 params give now.

    A stale pin is the normal state while `dvc repro` refetches an archive whose params
    changed (DVC rewrites the entry afterwards), so it is logged, not an error.
    """
    pins = read_pins(lock)
    holding = {}
    for spec in specs:
        pin = pins.get(spec.name)
        if pin is None or spec.sha256 is None:
            # No sha256: a local source known by the digest its fetch recorded
            # (ferflow.data.digests); a pin says nothing about which content that is.
            continue
        if pin.sha256 and pin.sha256 != spec.sha256.lower():
            log.info("%s: dvc.lock pins md5 %s for sha256 %s, but params give sha256 %s; the pin is stale and "
                     "not used (run `dvc repro` and commit dvc.lock to pin the new archive)", spec.name, pin.md5,
                     pin.sha256[:16], spec.sha256[:16])
            continue
        holding[spec.name] = pin
    return holding


def fetch_archives(specs: Iterable[ArchiveSpec], dest_dir: Path, settings: FetchSettings, lock: Lock = None,
                   remote: str = "") -> list[FetchResult]:
    """Download (or reuse) and verify each archive into `<dest_dir>/<name>.zip`: by md5 from
    the DVC remote when dvc.lock pins it and a remote is given, else from its params URI;
    every copy must match its params sha256 and its holding pin's md5."""
    specs = list(specs)
    pins = holding_pins(specs, lock)
    results = []
    for spec in specs:
        pin = pins.get(spec.name)
        from_remote = bool(pin and remote.strip()) and _fetch_pinned(spec, pin, remote, Path(dest_dir), settings)
        result = fetch_archive(spec, dest_dir, settings)
        if pin:
            _check_pin(spec, pin, result.path, settings.chunk_bytes)
        results.append(replace(result, downloaded=result.downloaded or from_remote, from_dvc_remote=from_remote))
    return results


def object_uri(remote: str, pin: DvcPin) -> str:
    """Where DVC stores the pinned file in a remote (DVC 3 layout unless the pin is legacy)."""
    if not remote.strip():
        raise FerflowError(f"{pin.name}: no DVC remote URL to fetch md5 {pin.md5} from; set the `dvc_remote` "
                           "pipeline parameter or compile with --dvc-remote")
    prefix = remote.rstrip("/") + ("/" if pin.legacy else "/files/md5/")
    return f"{prefix}{pin.md5[:2]}/{pin.md5[2:]}"


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    return file_digest(path, "md5", chunk)  # DVC's content address, not a security check


def _fetch_pinned(spec: ArchiveSpec, pin: DvcPin, remote: str, dest_dir: Path, settings: FetchSettings) -> bool:
    """Download the pinned object from the remote (verified against the params sha256);
    False, logged, when it cannot be fetched (not pushed, no credentials, other content)."""
    dest = layout.raw_archive(dest_dir, spec.name)
    if dest.is_file() and md5_file(dest, settings.chunk_bytes) == pin.md5:
        return False  # already the pinned content (a retried task)
    uri = object_uri(remote, pin)
    try:
        download(uri, dest, settings, expected_sha256=spec.sha256)
    except FerflowError as exc:
        log.warning("%s: pinned DVC object %s not fetched (%s); using %s", spec.name, redact_uri(uri), exc,
                    redact_uri(spec.uri))
        return False
    log.info("%s: fetched md5 %s from the DVC remote", spec.name, pin.md5)
    return True


def _check_pin(spec: ArchiveSpec, pin: DvcPin, path: Path, chunk: int) -> None:
    actual = md5_file(path, chunk)
    if actual != pin.md5:
        raise FerflowError(
            f"{spec.name}: {path} has md5 {actual}, but dvc.lock pins md5 {pin.md5} ({FETCH_STAGE}{spec.name}); "
            f"the lock does not describe this archive: run `dvc repro --force {FETCH_STAGE}{spec.name}` and "
            "commit dvc.lock, then recompile the pipeline (`ferflow pipeline compile`)"
        )


def _load(lock: Lock) -> dict:
    if lock is None or isinstance(lock, Mapping):
        return dict(lock or {})
    where = "dvc.lock"
    if isinstance(lock, os.PathLike):
        where, path = str(lock), Path(lock)
        if not path.is_file():
            return {}
        try:
            lock = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise FerflowError(f"{where}: cannot read it ({exc})") from None
    try:
        tree = yaml.safe_load(lock) if lock.strip() else {}
    except yaml.YAMLError as exc:
        raise FerflowError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise FerflowError(f"{where}: expected a mapping with `stages`, got {type(tree).__name__}")
    return tree
