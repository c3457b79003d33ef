"""What KServe and Kubernetes accept in an InferenceService: the API's constants, resource
quantities, names, and `validate`, which checks a whole document offline so that a typo
fails here with the field named instead of in the cluster (or, worse, silently dropped).
The KServe SDK cannot do this: its generated models ignore unknown fields."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any, Optional
from urllib.parse import urlsplit

from ferflow.errors import ConfigError

API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"
MODEL_FORMAT = "mlflow"
PROTOCOL = "v2"  # MLServer speaks V2 only; KServe has no V1 server for MLflow models
STORAGE_SCHEMES = ("s3", "gs", "pvc", "https")
SCALE_METRICS = ("cpu", "memory", "concurrency", "rps")
# Knative names a revision <name>-predictor-00001, a DNS label of at most 63 characters.
NAME_ROOM = 63 - len("-predictor-00001")
MIN_MEMORY = 64 * 2**20  # below this the container cannot even import torch

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_QUANTITY = re.compile(r"^(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+))"
                       r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$")
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


class ManifestError(ConfigError):
    """A model reference, option or manifest KServe would not take (exit code 2)."""


def first_line(exc: BaseException) -> str:
    """An exception's message in one line, for error messages that quote it."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


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


def quantity_problem(value: Any, kind: str) -> Optional[str]:
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


def dns_problem(value: Any, pattern: re.Pattern, limit: int) -> Optional[str]:
    """Why `value` is no DNS name of `pattern` (DNS1035, a DNS-1123 label or subdomain), or None."""
    if not isinstance(value, str) or not value:
        return "must be a non-empty string"
    if len(value) > limit:
        return f"{len(value)} characters, more than {limit}"
    if not pattern.match(value):
        what = ("lower-case letters, digits and '-', starting with a letter" if pattern is DNS1035 else
                "lower-case letters, digits and '-'" + (", '.'" if pattern is _DNS1123_SUBDOMAIN else "")
                + ", starting with a letter or digit")
        return f"expected {what} and ending with a letter or digit"
    return None


def check_name(where: str, value: Any, pattern: re.Pattern, limit: int, problems: list[str]) -> bool:
    """dns_problem, added to `problems` as "<where> <value>: <problem>"; True when none."""
    problem = dns_problem(value, pattern, limit)
    if problem:
        problems.append(f"{where} {value!r}: {problem}")
    return problem is None


def key_problem(key: Any) -> Optional[str]:
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
        if check_name("metadata.name", metadata.get("name"), DNS1035, 63, problems) and \
                len(metadata["name"]) > NAME_ROOM:
            notes.append(f"metadata.name has {len(metadata['name'])} characters: with Knative, the revision name "
                         f"{metadata['name']}-predictor-00001 exceeds 63; keep it to {NAME_ROOM}")
        if metadata.get("namespace") is not None:
            check_name("metadata.namespace", metadata["namespace"], _DNS1123_LABEL, 63, problems)
        for section in ("labels", "annotations"):
            entries = metadata.get(section)
            if entries is None or not need(f"metadata.{section}", entries, dict):
                continue
            for key, value in entries.items():
                problem = key_problem(key)
                if problem:
                    problems.append(f"metadata.{section} key {key!r}: {problem}")
                if not isinstance(value, str):
                    problems.append(f"metadata.{section}[{key!r}]: values must be strings (quote {value!r})")
                elif section == "labels" and (len(value) > 63 or not LABEL_VALUE.match(value)):
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
        check_name(f"{p}.serviceAccountName", predictor["serviceAccountName"], _DNS1123_SUBDOMAIN, 253, problems)
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
        check_name(f"{m}.runtime", model["runtime"], _DNS1123_SUBDOMAIN, 253, problems)
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
    if scheme == "pvc" and dns_problem(parts.netloc, _DNS1123_SUBDOMAIN, 253):
        return f"PVC name {parts.netloc!r}: {dns_problem(parts.netloc, _DNS1123_SUBDOMAIN, 253)}"
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
            problem = key_problem(key) or quantity_problem(value, kind)
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
