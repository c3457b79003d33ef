"""The registered MLflow model version a KServe manifest is pinned to.

KServe does not read the MLflow registry (kserve#3555), so `models:/<name>@<alias>` and
`models:/<name>/<version>` are resolved here, once, to the version's artifact location.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from ferflow.serving.kserve.validation import ManifestError

_MODEL_ID = re.compile(r"^models:/(?P<id>m-[0-9a-f]+)/?$")


@dataclass(frozen=True)
class RegisteredVersion:
    """One registered model version, as the registry said when the manifest was written."""

    name: str
    version: str
    alias: Optional[str]  # the alias the reference named, if any
    aliases: tuple[str, ...]  # every alias on this version at the time
    model_id: Optional[str]
    location: str  # the registry's artifact location of the logged model
    run_id: Optional[str] = None
    weights_sha256: Optional[str] = None
    engine: Optional[str] = None
    tracking_uri: str = ""  # redacted

    @property
    def pinned_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def ref(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else self.pinned_uri


def parse_ref(ref: str) -> tuple[str, Optional[str], Optional[str]]:
    """(name, alias, version) of models:/<name>@<alias> or models:/<name>/<version>."""
    from ferflow.serving.reference import REGISTRY_REF  # lazily: it imports torch, the CLI starts without

    match = REGISTRY_REF.match(ref.strip())
    if match is None:
        raise ManifestError(f"model reference {ref!r}: expected models:/<name>@<alias> or models:/<name>/<version> "
                            "(KServe serves registered versions; run directories and zoo names have no storageUri)")
    return match["name"], match["alias"], match["version"]


def resolve(params, ref: str) -> RegisteredVersion:
    """The registered version `ref` names, with its artifact location; ManifestError
    (exit 2) when the model, alias or version does not exist, FerflowError (exit 1) when
    the registry cannot be read."""
    from ferflow.serving.reference import find_version
    from ferflow.tracking import service

    name, alias, number = parse_ref(ref)
    client = service.configure(params)  # the tracking URI rules of every registry command
    where = service.redact_uri(service.current_tracking_uri() or "")
    with service.mlflow_errors(f"model reference {ref!r}: reading the registry", where=where):
        model, version = find_version(client, ref, name, alias, number, where)
        number = str(version.version)
        status = str(getattr(version, "status", "READY") or "READY")
        if status != "READY":
            raise ManifestError(f"model reference {ref!r}: {name} version {number} is {status}, not READY")
        location = client.get_model_version_download_uri(name, number)
    source_id = _MODEL_ID.match(str(version.source or ""))
    tags = dict(version.tags or {})
    return RegisteredVersion(
        name=name, version=str(version.version), alias=alias,
        aliases=tuple(sorted(a for a, v in model.aliases.items() if str(v) == str(version.version))),
        model_id=getattr(version, "model_id", None) or (source_id["id"] if source_id else None),
        location=str(location), run_id=version.run_id, weights_sha256=tags.get("model.weights_sha256"),
        engine=tags.get("serve.engine"), tracking_uri=where)
