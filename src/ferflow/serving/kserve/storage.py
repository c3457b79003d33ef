"""The storageUri KServe's storage initializer reads for a registered version's artifacts,
and an optional check that the folder there holds that version (--check-storage).

Where the artifacts live decides the storageUri:

    s3://... gs://...          used as they are (plus the trailing "/")
    wasbs://c@a.blob.core...   as https://a.blob.core.windows.net/c/... (KServe's Azure form)
    mlflow-artifacts:/...      the tracking server proxies them: KServe's storage initializer
                               cannot read that; --artifacts-destination (the server's own
                               --artifacts-destination) maps it to the real bucket
    file:// or a local path    this machine's disk: copy the folder to a PVC and pass
                               --storage-uri pvc://<claim>/<path>/
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from ferflow.errors import FerflowError
from ferflow.serving.kserve.registry import RegisteredVersion
from ferflow.serving.kserve.validation import STORAGE_SCHEMES, ManifestError, first_line

_AZURE_BLOB = re.compile(
    r"^wasbs?://(?P<container>[^@/]+)@(?P<account>[^./]+)\.blob\.core\.windows\.net/?(?P<path>.*)$")


def storage_uri_for(location: str, artifacts_destination: Optional[str] = None) -> str:
    """The storageUri KServe's storage initializer can read for an MLflow artifact location."""
    location = location.strip()
    scheme = urlsplit(location).scheme.lower()
    if scheme == "mlflow-artifacts":
        if not artifacts_destination:
            raise ManifestError(
                f"the model's artifacts are at {location}, proxied by the MLflow tracking server: KServe's storage "
                "initializer cannot read mlflow-artifacts: URIs. Pass --artifacts-destination with the server's "
                "--artifacts-destination (e.g. s3://bucket/mlflow) to map it to the bucket, or --storage-uri")
        # mlflow-artifacts:/<path> and mlflow-artifacts://host:port/<path> both mean <destination>/<path>
        path = urlsplit(location).path.lstrip("/")
        return _folder(f"{artifacts_destination.rstrip('/')}/{path}")
    azure = _AZURE_BLOB.match(location)
    if azure:
        return _folder(f"https://{azure['account']}.blob.core.windows.net/{azure['container']}/{azure['path']}")
    if scheme in ("s3", "gs", "https"):
        return _folder(location)
    if scheme in ("", "file") or re.match(r"^[A-Za-z]:[\\/]", location):
        raise ManifestError(
            f"the model's artifacts are on this machine's disk ({location}): KServe cannot read them. Log models to "
            "a tracking server with S3/GCS artifacts, or copy that folder to a PersistentVolumeClaim and pass "
            "--storage-uri pvc://<claim>/<path>/")
    raise ManifestError(f"the model's artifacts are at {location}: KServe's storage initializer does not read "
                        f"{scheme}: URIs ({', '.join(s + '://' for s in STORAGE_SCHEMES)}); pass --storage-uri")


def _folder(uri: str) -> str:
    """KServe copies a prefix without "/" differently (kserve#3899): always name the folder."""
    return uri if uri.endswith("/") else uri + "/"


def check_storage(storage_uri: str, version: RegisteredVersion) -> None:
    """Read MLmodel at `storage_uri` (S3 or GCS, with this machine's credentials) and check
    that it is this version's ferflow model: the folder KServe will download."""
    import mlflow.artifacts
    import yaml

    scheme = urlsplit(storage_uri).scheme
    if scheme not in ("s3", "gs"):
        raise ManifestError(f"--check-storage reads s3:// and gs:// locations only, not {storage_uri}")
    with tempfile.TemporaryDirectory(prefix="ferflow-storage-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=storage_uri + "MLmodel", dst_path=tmp)
            mlmodel = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except Exception as exc:  # noqa: BLE001 - boto3/GCS/MLflow errors: one message naming the URI
            from ferflow.redact import redact_text

            raise FerflowError(f"--check-storage: cannot read {storage_uri}MLmodel ({redact_text(first_line(exc))}); "
                               "KServe's storage initializer would find no model there either") from None
    found = mlmodel.get("model_id")
    if version.model_id and found != version.model_id:
        raise ManifestError(f"--check-storage: {storage_uri} holds model {found or '(no model_id)'}, not "
                            f"{version.pinned_uri} (model {version.model_id}); check --artifacts-destination / "
                            "--storage-uri")
    artifacts = ((mlmodel.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}
    if not {"weights", "run_json"} <= set(artifacts):
        raise ManifestError(f"--check-storage: the MLmodel at {storage_uri} is not a ferflow model (no weights "
                            "and run_json artifacts)")
