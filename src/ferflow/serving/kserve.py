"""KServe InferenceService manifests for registered ferflow models (`ferflow serve`).

KServe serves an MLflow model with `modelFormat: mlflow` on MLServer over the V2 (Open
Inference) protocol, from `storageUri`: the logged model's folder (the one holding MLmodel),
ending in "/". KServe does not read the MLflow registry (kserve#3555), so `models:/<name>@<alias>`
and `models:/<name>/<version>` are resolved here, once, to the version's artifact location,
and the manifest is pinned to that version: it records the registered model, the version,
the alias it was asked for and the logged model id in labels and annotations. When the
alias moves (`ferflow promote`), the manifest does not follow it: generate it again and
`kubectl apply` it.

Where the artifacts live decides the storageUri:

    s3://... gs://...          used as they are (plus the trailing "/")
    wasbs://c@a.blob.core...   as https://a.blob.core.windows.net/c/... (KServe's Azure form)
    mlflow-artifacts:/...      the tracking server proxies them: KServe's storage initializer
                               cannot read that; --artifacts-destination (the server's own
                               --artifacts-destination) maps it to the real bucket
    file:// or a local path    this machine's disk: copy the folder to a PVC and pass
                               --storage-uri pvc://<claim>/<path>/

The manifest is checked offline against what KServe and Kubernetes require (`validate`), so
that a typo fails here with the field named instead of in the cluster (or, worse, silently
dropped). The KServe SDK cannot do this: its generated models ignore unknown fields.
"""

from __future__ import annotations

import math
import re
import sys
import tempfile
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Optional
from urllib.parse import urlsplit

import typer

from ferflow.errors import ConfigError, FerflowError

API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"
MODEL_FORMAT = "mlflow"
PROTOCOL = "v2"  # MLServer speaks V2 only; KServe has no V1 server for MLflow models
MODEL_CLASS = "mlserver_mlflow.MLflowRuntime"
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts the storageUri's files
STORAGE_SCHEMES = ("s3", "gs", "pvc", "https")
SCALE_METRICS = ("cpu", "memory", "concurrency", "rps")
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_CPU, DEFAULT_MEMORY = "2", "4Gi"
PREFIX = "ferflow.io/"
# Knative names a revision <name>-predictor-00001, a DNS label of at most 63 characters.
NAME_ROOM = 63 - len("-predictor-00001")
MIN_MEMORY = 64 * 2**20  # below this the container cannot even import torch

_MODEL_ID = re.compile(r"^models:/(?P<id>m-[0-9a-f]+)/?$")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_QUANTITY = re.compile(r"^(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+))"
                       r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$")
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_AZURE_BLOB = re.compile(
    r"^wasbs?://(?P<container>[^@/]+)@(?P<account>[^./]+)\.blob\.core\.windows\.net/?(?P<path>.*)$")


class ManifestError(ConfigError):
    """A model reference, option or manifest KServe would not take (exit code 2)."""


# ---------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ServeOptions:
    """What `ferflow serve manifest` takes besides the model reference."""

    name: Optional[str] = None  # default: from the registered model's name (see default_name)
    namespace: Optional[str] = None
    gpus: int = 0
    gpu_resource: str = GPU_RESOURCE
    cpu: str = DEFAULT_CPU  # request and limit
    memory: str = DEFAULT_MEMORY  # request and limit
    min_replicas: int = 1
    max_replicas: int = 1
    scale_metric: Optional[str] = None
    scale_target: Optional[int] = None
    service_account: Optional[str] = None
    runtime: Optional[str] = None  # a ServingRuntime / ClusterServingRuntime name
    image: Optional[str] = None  # overrides the runtime's container image
    storage_uri: Optional[str] = None
    artifacts_destination: Optional[str] = None


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


@dataclass
class Manifest:
    doc: dict
    version: RegisteredVersion
    storage_uri: str
    notes: list[str] = field(default_factory=list)  # warnings worth reading before applying

    def to_yaml(self) -> str:
        import yaml

        from ferflow import __version__

        v = self.version
        alias = f" (alias {v.alias} when written)" if v.alias else ""
        header = [
            f"# KServe InferenceService for {v.pinned_uri}{alias}, generated by ferflow {__version__}",
            "# (`ferflow serve manifest`). KServe cannot follow MLflow aliases: after a promotion,",
            "# generate it again and `kubectl apply -f` it. Request: POST",
            f"# /v2/models/{self.doc['metadata']['name']}/infer (V2; see docs/serving.md).",
        ]
        return "\n".join(header) + "\n" + yaml.safe_dump(self.doc, sort_keys=False, width=1000)


# ---------------------------------------------------------------------------- registry


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


# ---------------------------------------------------------------------------- storage


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

            raise FerflowError(f"--check-storage: cannot read {storage_uri}MLmodel ({redact_text(_first_line(exc))}); "
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# ---------------------------------------------------------------------------- manifest


def default_name(version: RegisteredVersion) -> str:
    """The registered model's name as a DNS label; `-<alias>` unless champion, `-v<N>` for a
    version: re-applying the champion's manifest updates one stable service."""
    base = re.sub(r"[^a-z0-9]+", "-", version.name.lower()).strip("-") or "model"
    if not base[0].isalpha():
        base = "m-" + base
    suffix = "" if version.alias == "champion" else (
        "-" + (re.sub(r"[^a-z0-9]+", "-", version.alias.lower()).strip("-") or "alias") if version.alias
        else f"-v{version.version}")
    return base[:NAME_ROOM - len(suffix)].rstrip("-") + suffix


def build(version: RegisteredVersion, options: ServeOptions, storage_uri: str) -> dict:
    """The InferenceService document (not yet validated)."""
    from ferflow import __version__

    name = options.name if options.name is not None else default_name(version)
    labels = {"app.kubernetes.io/name": "ferflow", "modelClass": MODEL_CLASS,
              PREFIX + "registered-model": version.name, PREFIX + "model-version": version.version}
    if version.alias:
        labels[PREFIX + "model-alias"] = version.alias
    for key in (PREFIX + "registered-model", PREFIX + "model-alias"):
        if key in labels and (len(labels[key]) > 63 or not _LABEL_VALUE.match(labels[key])):
            del labels[key]  # not a label value; the annotations, which take any text, keep it
    annotations = {
        PREFIX + "model-ref": version.ref, PREFIX + "model-uri": version.pinned_uri,
        PREFIX + "registered-model": version.name, PREFIX + "model-version": version.version,
        PREFIX + "model-alias": version.alias or "", PREFIX + "model-aliases": ",".join(version.aliases),
        PREFIX + "model-id": version.model_id or "", PREFIX + "model-location": _redact(version.location),
        PREFIX + "weights-sha256": version.weights_sha256 or "", PREFIX + "engine": version.engine or "",
        PREFIX + "tracking-uri": version.tracking_uri, PREFIX + "generated-by": f"ferflow {__version__}",
    }
    metadata: dict[str, Any] = {"name": name}
    if options.namespace:
        metadata["namespace"] = options.namespace
    metadata["labels"] = labels
    metadata["annotations"] = {k: v for k, v in annotations.items() if v}

    threads = str(max(1, math.floor(_cpus(options.cpu))))
    model: dict[str, Any] = {"modelFormat": {"name": MODEL_FORMAT}, "protocolVersion": PROTOCOL}
    if options.runtime:
        model["runtime"] = options.runtime
    if options.image:
        model["image"] = options.image  # merged over the runtime's container by KServe
    model["storageUri"] = storage_uri
    model["env"] = [
        # KServe sets these three only for its own kserve-mlserver runtime; a --runtime of
        # one's own gets them here (the V2 path is /v2/models/<MLSERVER_MODEL_NAME>/infer).
        {"name": "MLSERVER_MODEL_NAME", "value": name},
        {"name": "MLSERVER_MODEL_URI", "value": MODEL_DIR},
        {"name": "MLSERVER_MODEL_IMPLEMENTATION", "value": MODEL_CLASS},
        # ferflow's pyfunc refuses `path` inputs (server-side files) when this is set; MLflow's
        # own scoring server sets it, MLServer does not.
        {"name": "_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "value": "true"},
        # torch and onnxruntime otherwise size their thread pools to the node, not the pod.
        {"name": "FERFLOW_CPUS", "value": threads},
        {"name": "OMP_NUM_THREADS", "value": threads},
    ]
    limits: dict[str, Any] = {"cpu": options.cpu, "memory": options.memory}
    if options.gpus:
        limits[options.gpu_resource] = str(options.gpus)  # extended resources: limits only
    model["resources"] = {"requests": {"cpu": options.cpu, "memory": options.memory}, "limits": limits}

    predictor: dict[str, Any] = {"minReplicas": options.min_replicas, "maxReplicas": options.max_replicas}
    if options.scale_metric:
        predictor["scaleMetric"] = options.scale_metric
    if options.scale_target is not None:
        predictor["scaleTarget"] = options.scale_target
    if options.service_account:
        predictor["serviceAccountName"] = options.service_account
    predictor["model"] = model
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": {"predictor": predictor}}


def _redact(uri: str) -> str:
    from ferflow.redact import redact_uri

    return redact_uri(uri)


def _cpus(text: str) -> float:
    try:
        return float(parse_quantity(text))
    except ValueError:
        return 1.0  # validate() reports it


def manifest(params, ref: str, options: ServeOptions, check: bool = False) -> Manifest:
    """Resolve `ref`, build its InferenceService and validate it; `check` also reads the
    model's MLmodel at the storageUri (see check_storage)."""
    if options.storage_uri and options.artifacts_destination:
        raise ManifestError("give --storage-uri or --artifacts-destination, not both")
    _check_options(options)
    version = resolve(params, ref)
    storage_uri = (options.storage_uri.strip() if options.storage_uri
                   else storage_uri_for(version.location, options.artifacts_destination))
    doc = build(version, options, storage_uri)
    notes = validate(doc)
    if check:
        check_storage(storage_uri, version)
    if options.artifacts_destination and not version.location.startswith("mlflow-artifacts:"):
        notes.append(f"--artifacts-destination unused: the artifacts are not proxied ({version.location})")
    return Manifest(doc, version, storage_uri, notes + _notes(version, options))


def _check_options(options: ServeOptions) -> None:
    """Option errors named by their flag, before the registry is asked anything."""
    problems = []
    if options.gpus < 0:
        problems.append(f"--gpus {options.gpus}: expected 0 or more")
    if "/" not in options.gpu_resource or _key_problem(options.gpu_resource):
        problems.append(f"--gpu-resource {options.gpu_resource!r}: expected an extended resource name such as "
                        f"{GPU_RESOURCE} or amd.com/gpu")
    if options.min_replicas < 0:
        problems.append(f"--min-replicas {options.min_replicas}: expected 0 or more")
    if options.max_replicas < max(1, options.min_replicas):
        problems.append(f"--max-replicas {options.max_replicas}: expected at least 1 and at least --min-replicas "
                        f"({options.min_replicas})")
    if options.scale_metric is not None and options.scale_metric not in SCALE_METRICS:
        problems.append(f"--scale-metric {options.scale_metric!r}: expected one of {', '.join(SCALE_METRICS)}")
    if options.scale_target is not None and options.scale_target < 1:
        problems.append(f"--scale-target {options.scale_target}: expected a positive integer")
    for flag, value in (("--cpu", options.cpu), ("--memory", options.memory)):
        problem = _quantity_problem(value, "cpu" if flag == "--cpu" else "memory")
        if problem:
            problems.append(f"{flag} {value!r}: {problem}")
    if options.name is not None and _dns_problem(options.name, _DNS1035, 63):
        problems.append(f"--name {options.name!r}: {_dns_problem(options.name, _DNS1035, 63)}")
    if problems:
        raise ManifestError("; ".join(problems))


def _notes(version: RegisteredVersion, options: ServeOptions) -> list[str]:
    notes = []
    if options.gpus and version.engine == "onnx":
        notes.append("the version runs on onnxruntime (serve.engine onnx): GPUs help only with an image that has "
                     "onnxruntime-gpu")
    if not options.image and not options.runtime:
        notes.append("no --image or --runtime: KServe's default MLServer image lacks torch and timm, which this "
                     "model imports (MLServer installs no requirements); see docs/serving.md")
    elif options.image and not options.runtime:
        notes.append("--image without --runtime keeps kserve-mlserver's container, which runs the image's default "
                     "command: the image must start `mlserver start /mnt/models` by itself")
    return notes


# ---------------------------------------------------------------------------- validation


def parse_quantity(value: Any) -> Decimal:
    """A Kubernetes resource quantity ("500m", "4Gi", "1.5", "2e3", 8) as a number."""
    text = str(value).strip() if not isinstance(value, bool) else ""
    match = _QUANTITY.match(text)
    if match is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 2, 500m, 4Gi, 512Mi)")
    try:
        number = Decimal(match["number"])
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a Kubernetes quantity") from None
    suffix = match["suffix"] or ""
    if suffix in _BINARY:
        return number * (2 ** (10 * _BINARY[suffix]))
    if suffix in _DECIMAL:
        return number.scaleb(_DECIMAL[suffix])
    return number.scaleb(int(suffix[1:]))


def _quantity_problem(value: Any, kind: str) -> Optional[str]:
    """Why `value` is no usable `kind` (cpu, memory, gpu) quantity, or None."""
    try:
        amount = parse_quantity(value)
    except ValueError as exc:
        return str(exc)
    if amount <= 0:
        return "must be positive"
    if kind == "cpu" and amount < Decimal("0.001"):
        return "finer than 1m, the smallest CPU unit"
    if kind == "memory" and amount < MIN_MEMORY:
        hint = f" (did you mean {value}Gi?)" if re.fullmatch(r"\d+(\.\d+)?", str(value).strip()) else ""
        return f"is {amount.normalize():f} bytes, too little to load a model{hint}"
    if kind == "extended" and amount != amount.to_integral_value():
        return "extended resources such as GPUs come in whole units"
    return None


def _dns_problem(value: Any, pattern: re.Pattern, limit: int) -> Optional[str]:
    if not isinstance(value, str) or not value:
        return "must be a non-empty string"
    if len(value) > limit:
        return f"{len(value)} characters, more than {limit}"
    if not pattern.match(value):
        what = ("lower-case letters, digits and '-', starting with a letter" if pattern is _DNS1035 else
                "lower-case letters, digits and '-'" + (", '.'" if pattern is _DNS1123_SUBDOMAIN else "")
                + ", starting with a letter or digit")
        return f"expected {what} and ending with a letter or digit"
    return None


def _key_problem(key: Any) -> Optional[str]:
    """Kubernetes label / annotation key: [prefix/]name."""
    if not isinstance(key, str):
        return "must be a string"
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        return f"prefix {prefix!r} is not a DNS subdomain"
    if not name or len(name) > 63 or not _QUALIFIED_NAME.match(name):
        return "name part must be 1-63 characters of letters, digits, '-', '_', '.', starting and ending alphanumeric"
    return None


def validate(doc: Any) -> list[str]:
    """Check an InferenceService document against what KServe and Kubernetes require of
    the fields ferflow writes. Raises ManifestError naming every problem; returns notes
    (valid, but likely not what was meant)."""
    problems: list[str] = []
    notes: list[str] = []

    def need(where: str, value: Any, kind: type) -> bool:
        if not isinstance(value, kind):
            what = {dict: "a mapping", str: "a string", list: "a list", int: "an integer"}[kind]
            problems.append(f"{where}: required, {what}" if value is None else f"{where}: expected {what}")
            return False
        return True

    if not need("document", doc, dict):
        raise ManifestError(f"not an InferenceService: {'; '.join(problems)}")
    if doc.get("apiVersion") != API_VERSION:
        problems.append(f"apiVersion: expected {API_VERSION}, got {doc.get('apiVersion')!r}")
    if doc.get("kind") != KIND:
        problems.append(f"kind: expected {KIND}, got {doc.get('kind')!r}")
    metadata = doc.get("metadata")
    if need("metadata", metadata, dict):
        problem = _dns_problem(metadata.get("name"), _DNS1035, 63)
        if problem:
            problems.append(f"metadata.name {metadata.get('name')!r}: {problem}")
        elif len(metadata["name"]) > NAME_ROOM:
            notes.append(f"metadata.name has {len(metadata['name'])} characters: with Knative, the revision name "
                         f"{metadata['name']}-predictor-00001 exceeds 63; keep it to {NAME_ROOM}")
        if metadata.get("namespace") is not None:
            problem = _dns_problem(metadata["namespace"], _DNS1123_LABEL, 63)
            if problem:
                problems.append(f"metadata.namespace {metadata['namespace']!r}: {problem}")
        for section in ("labels", "annotations"):
            entries = metadata.get(section)
            if entries is None or not need(f"metadata.{section}", entries, dict):
                continue
            for key, value in entries.items():
                problem = _key_problem(key)
                if problem:
                    problems.append(f"metadata.{section} key {key!r}: {problem}")
                if not isinstance(value, str):
                    problems.append(f"metadata.{section}[{key!r}]: values must be strings (quote {value!r})")
                elif section == "labels" and (len(value) > 63 or not _LABEL_VALUE.match(value)):
                    problems.append(f"metadata.labels[{key!r}] {value!r}: at most 63 letters, digits, '-', '_', '.', "
                                    "starting and ending alphanumeric")
    spec = doc.get("spec")
    if need("spec", spec, dict) and need("spec.predictor", spec.get("predictor"), dict):
        name = metadata.get("name") if isinstance(metadata, dict) else None
        _validate_predictor(spec["predictor"], problems, notes, name if isinstance(name, str) else None)
    if problems:
        raise ManifestError("InferenceService not valid for KServe: " + "; ".join(problems))
    return notes


def _validate_predictor(predictor: dict, problems: list[str], notes: list[str], name: Optional[str]) -> None:
    p = "spec.predictor"
    low, high = predictor.get("minReplicas"), predictor.get("maxReplicas")
    for key, value in (("minReplicas", low), ("maxReplicas", high)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            problems.append(f"{p}.{key} {value!r}: expected an integer >= 0")
    if isinstance(low, int) and isinstance(high, int) and high and high < low:
        problems.append(f"{p}.maxReplicas {high} is below minReplicas {low}")
    if low == 0:
        notes.append("minReplicas 0 scales to zero only in Knative (serverless) mode; the first request then waits "
                     "for a pod to start and load the model")
    metric, target = predictor.get("scaleMetric"), predictor.get("scaleTarget")
    if metric is not None and metric not in SCALE_METRICS:
        problems.append(f"{p}.scaleMetric {metric!r}: expected one of {', '.join(SCALE_METRICS)}")
    if target is not None and (not isinstance(target, int) or isinstance(target, bool) or target < 1):
        problems.append(f"{p}.scaleTarget {target!r}: expected a positive integer")
    if predictor.get("serviceAccountName") is not None:
        problem = _dns_problem(predictor["serviceAccountName"], _DNS1123_SUBDOMAIN, 253)
        if problem:
            problems.append(f"{p}.serviceAccountName {predictor['serviceAccountName']!r}: {problem}")
    model = predictor.get("model")
    if not isinstance(model, dict):
        problems.append(f"{p}.model: required, a mapping (modelFormat, storageUri, ...)")
        return
    m = f"{p}.model"
    fmt = model.get("modelFormat")
    if not isinstance(fmt, dict) or not isinstance(fmt.get("name"), str) or not fmt.get("name"):
        problems.append(f"{m}.modelFormat.name: required (mlflow)")
    elif fmt["name"] == MODEL_FORMAT and model.get("protocolVersion") != PROTOCOL:
        problems.append(f"{m}.protocolVersion {model.get('protocolVersion')!r}: MLflow models are served over "
                        f"{PROTOCOL} (MLServer)")
    if model.get("runtime") is not None:
        problem = _dns_problem(model["runtime"], _DNS1123_SUBDOMAIN, 253)
        if problem:
            problems.append(f"{m}.runtime {model['runtime']!r}: {problem}")
    image = model.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip() or re.search(r"\s", image)):
        problems.append(f"{m}.image {image!r}: expected an image reference without spaces")
    problem = _storage_problem(model.get("storageUri"))
    if problem:
        problems.append(f"{m}.storageUri {model.get('storageUri')!r}: {problem}")
    env = model.get("env", [])
    if not isinstance(env, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                            and _ENV_NAME.match(e["name"]) and isinstance(e.get("value", ""), str)
                                            for e in env):
        problems.append(f"{m}.env: expected a list of {{name, value}} with string values")
    elif name is not None:
        served_as = next((e.get("value") for e in env if e["name"] == "MLSERVER_MODEL_NAME"), name)
        if served_as != name:
            problems.append(f"{m}.env MLSERVER_MODEL_NAME {served_as!r} differs from metadata.name {name!r}: "
                            f"clients would call /v2/models/{name}/infer and get 404")
    _validate_resources(model.get("resources"), f"{m}.resources", problems)


def _storage_problem(uri: Any) -> Optional[str]:
    if not isinstance(uri, str) or not uri.strip():
        return "required: the model folder, e.g. s3://bucket/path/to/model/"
    if uri != uri.strip() or re.search(r"\s", uri):
        return "contains whitespace"
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in STORAGE_SCHEMES:
        return (f"KServe's storage initializer reads {', '.join(s + '://' for s in STORAGE_SCHEMES)} here; "
                + ("mlflow-artifacts: is the tracking server's proxy (pass --artifacts-destination)"
                   if scheme == "mlflow-artifacts" else f"not {scheme or 'a bare path'}"))
    if not uri.startswith(f"{scheme}://") or not parts.netloc:
        where = {"pvc": "claim", "https": "host"}.get(scheme, "bucket")
        return f"expected {scheme}://<{where}>/<path>/"
    if parts.username or parts.password or "@" in parts.netloc:
        return "holds credentials; give them to the storage initializer through the service account's Secret"
    if parts.query or parts.fragment:
        return "has a query or fragment; signed URLs expire, use a service account"
    if scheme == "pvc" and _dns_problem(parts.netloc, _DNS1123_SUBDOMAIN, 253):
        return f"PVC name {parts.netloc!r}: {_dns_problem(parts.netloc, _DNS1123_SUBDOMAIN, 253)}"
    if scheme in ("s3", "gs") and not re.match(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$", parts.netloc):
        return f"bucket {parts.netloc!r} is not a valid bucket name"
    if not uri.endswith("/"):
        return ("must end in '/': it names the model's folder (the one holding MLmodel), and KServe copies a "
                "prefix without '/' into a nested path or with sibling folders (kserve#3899)")
    if parts.path.strip("/") == "":
        return "names a whole bucket or volume; point it at the model's folder"
    return None


def _validate_resources(resources: Any, where: str, problems: list[str]) -> None:
    if resources is None:
        return
    if not isinstance(resources, dict) or set(resources) - {"requests", "limits", "claims"}:
        problems.append(f"{where}: expected a mapping with requests and/or limits")
        return
    parsed: dict[str, dict[str, Decimal]] = {}
    for part in ("requests", "limits"):
        entries = resources.get(part) or {}
        if not isinstance(entries, dict):
            problems.append(f"{where}.{part}: expected a mapping of resource name to quantity")
            continue
        parsed[part] = {}
        for key, value in entries.items():
            kind = "cpu" if key == "cpu" else "memory" if key == "memory" else (
                "extended" if "/" in str(key) else "other")
            problem = _key_problem(key) or _quantity_problem(value, kind)
            if problem:
                problems.append(f"{where}.{part}.{key} {value!r}: {problem}")
            else:
                parsed[part][key] = parse_quantity(value)
    requests, limits = parsed.get("requests", {}), parsed.get("limits", {})
    for key, amount in requests.items():
        if key in limits and amount > limits[key]:
            problems.append(f"{where}.requests.{key} is above limits.{key}")
        if "/" in key and key in limits and amount != limits[key]:
            problems.append(f"{where}: {key} requests must equal limits (extended resources are not overcommitted)")
        if "/" in key and key not in limits:
            problems.append(f"{where}.requests.{key}: extended resources such as GPUs need a limit")


# ---------------------------------------------------------------------------- command line

serve_app = typer.Typer(
    name="serve",
    help="Serving on Kubernetes: KServe InferenceService manifests for registered models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file (YAML): the tracking URI")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override a key (repeatable)")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="show tracebacks and debug logs")]


@serve_app.command("manifest")
def manifest_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="models:/<name>@<alias> or models:/<name>/<version>; "
                                       "an alias is pinned to its current version")],
    name: Annotated[Optional[str], typer.Option(
        "--name", help="InferenceService name (DNS-1035 label; default: the registered model's name, plus -<alias> "
        "unless champion, or -v<version>)")] = None,
    namespace: Annotated[Optional[str], typer.Option("--namespace", "-n", help="Kubernetes namespace")] = None,
    gpus: Annotated[int, typer.Option("--gpus", help="GPUs per replica (a limit on --gpu-resource)")] = 0,
    gpu_resource: Annotated[str, typer.Option("--gpu-resource", help="GPU resource name")] = GPU_RESOURCE,
    cpu: Annotated[str, typer.Option("--cpu", help="CPU request and limit per replica (e.g. 2, 500m)")] = DEFAULT_CPU,
    memory: Annotated[str, typer.Option("--memory", help="memory request and limit per replica (e.g. 4Gi)")]
    = DEFAULT_MEMORY,
    min_replicas: Annotated[int, typer.Option("--min-replicas", help="0 scales to zero (Knative mode only)")] = 1,
    max_replicas: Annotated[int, typer.Option("--max-replicas", help="upper bound for the autoscaler")] = 1,
    scale_metric: Annotated[Optional[str], typer.Option(
        "--scale-metric", help=f"autoscaling metric: {', '.join(SCALE_METRICS)}")] = None,
    scale_target: Annotated[Optional[int], typer.Option(
        "--scale-target", help="autoscaling target (cpu/memory: % of the request; concurrency; rps)")] = None,
    service_account: Annotated[Optional[str], typer.Option(
        "--service-account", help="service account whose Secret gives the storage initializer S3/GCS access")] = None,
    runtime: Annotated[Optional[str], typer.Option(
        "--runtime", help="ServingRuntime/ClusterServingRuntime name (default: KServe picks kserve-mlserver)")] = None,
    image: Annotated[Optional[str], typer.Option(
        "--image", help="serving image (MLServer + mlserver-mlflow + torch/timm) over the runtime's")] = None,
    storage_uri: Annotated[Optional[str], typer.Option(
        "--storage-uri", help="use this model folder (s3://, gs://, pvc://, https://; ending in /) instead of the "
        "registry's location")] = None,
    artifacts_destination: Annotated[Optional[str], typer.Option(
        "--artifacts-destination", envvar="FERFLOW_ARTIFACTS_DESTINATION",
        help="the tracking server's --artifacts-destination (e.g. s3://bucket/mlflow): maps proxied "
             "mlflow-artifacts: locations to it")] = None,
    check: Annotated[bool, typer.Option(
        "--check-storage", help="read MLmodel at the storageUri (S3/GCS, this machine's credentials) and check it "
        "is this version")] = False,
    out_file: Annotated[Optional[Path], typer.Option("--out", "-o", help="write the YAML here (default: stdout)")]
    = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Write a KServe InferenceService (MLflow format, V2 protocol) for a registered version."""
    from ferflow.cli import _load

    cfg = _load(params, set_, verbose)
    options = ServeOptions(name=name, namespace=namespace, gpus=gpus, gpu_resource=gpu_resource, cpu=cpu,
                           memory=memory, min_replicas=min_replicas, max_replicas=max_replicas,
                           scale_metric=scale_metric, scale_target=scale_target, service_account=service_account,
                           runtime=runtime, image=image, storage_uri=storage_uri,
                           artifacts_destination=artifacts_destination)
    result = manifest(cfg, model, options, check)
    text = result.to_yaml()
    if out_file is None:
        sys.stdout.write(text)  # plain: `| kubectl apply -f -` must get the YAML unwrapped
        sys.stdout.flush()
    else:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(text, encoding="utf-8")
    v = result.version
    _say(f"{result.doc['metadata']['name']}: {v.pinned_uri}" + (f" (alias {v.alias})" if v.alias else "")
         + f" from {result.storage_uri}" + (" (checked)" if check else "")
         + (f"; written to {out_file}" if out_file else ""))
    for note in result.notes:
        _say(f"note: {note}")


@serve_app.command("validate")
def validate_cmd(
    files: Annotated[list[Path], typer.Argument(
        metavar="FILE", help="InferenceService YAML files (several documents each allowed)")],
) -> None:
    """Check InferenceService YAML offline (names, storageUri, protocol, resources, replicas)."""
    import yaml

    count = 0
    for path in files:
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
        except (OSError, yaml.YAMLError) as exc:
            raise ManifestError(f"{path}: cannot read it as YAML ({_first_line(exc)})") from None
        for i, doc in enumerate(docs):
            if isinstance(doc, dict) and doc.get("kind") not in (None, KIND):
                continue  # a Secret or ServiceAccount beside it
            try:
                notes = validate(doc)
            except ManifestError as exc:
                raise ManifestError(f"{path} (document {i + 1}): {exc}") from None
            count += 1
            for note in notes:
                _say(f"note: {path} (document {i + 1}): {note}")
    if not count:
        raise ManifestError(f"no InferenceService in {', '.join(map(str, files))}")
    _say(f"{count} InferenceService(s) valid")


def _say(text: str) -> None:
    """Messages on stderr: stdout may be piped into kubectl."""
    typer.echo(text, err=True)
