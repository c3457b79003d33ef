"""KServe InferenceService manifests for registered ferflow models (`ferflow serve`).

KServe serves an MLflow model with `modelFormat: mlflow` on MLServer over the V2 (Open
Inference) protocol, from `storageUri`: the logged model's folder (the one holding MLmodel),
ending in "/". KServe does not read the MLflow registry (kserve#3555), so `models:/<name>@<alias>`
and `models:/<name>/<version>` are resolved here, once, to the version's artifact location,
and the manifest is pinned to that version. When the alias moves (`ferflow promote`), the
manifest does not follow it: generate it again and `kubectl apply` it.

    registry     the registered version a reference names (RegisteredVersion, resolve)
    storage      the storageUri KServe can read for its artifacts, and --check-storage
    manifest     the InferenceService document (ServeOptions, build, manifest)
    validation   what KServe and Kubernetes accept, checked offline (validate)

The `ferflow serve` commands are in ferflow.serving.cli. This package imports neither torch
nor MLflow until a registry is read.
"""

from ferflow.serving.kserve.manifest import (
    DEFAULT_CPU, DEFAULT_MEMORY, GPU_RESOURCE, Manifest, ServeOptions, build, default_name, manifest,
)
from ferflow.serving.kserve.registry import RegisteredVersion, parse_ref, resolve
from ferflow.serving.kserve.storage import check_storage, storage_uri_for
from ferflow.serving.kserve.validation import (
    API_VERSION, KIND, NAME_ROOM, SCALE_METRICS, ManifestError, parse_quantity, validate,
)

__all__ = [
    "API_VERSION", "DEFAULT_CPU", "DEFAULT_MEMORY", "GPU_RESOURCE", "KIND", "NAME_ROOM", "SCALE_METRICS", "Manifest",
    "ManifestError", "RegisteredVersion", "ServeOptions", "build", "check_storage", "default_name", "manifest",
    "parse_quantity", "parse_ref", "resolve", "storage_uri_for", "validate",
]
