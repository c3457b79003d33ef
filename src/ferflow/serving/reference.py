"""Model references: what `--model REF` of predict (and export) accepts.

    models:/<name>@<alias>    a registered version by alias (champion, challenger, ...)
    models:/<name>/<version>  a registered version by number
    <directory>               a training run directory (run.json + best.safetensors)
    <zoo name>                a pretrained zoo model, zero-shot (its expression head mapped
                              to the 3 classes; see `ferflow models`)

A registered version's weights and run.json are downloaded once into the ferflow cache
(`$FERFLOW_CACHE/registry`), keyed by the store and the version's logged model, and checked
against the version's weights sha256 tag when it has one.

`export_reference` is `ferflow export`: the model a reference names, written as ONNX by
`ferflow.models.export` (which, below serving, knows nothing of references or the registry).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from ferflow import layout
from ferflow.config import Params
from ferflow.errors import ConfigError, FerflowError
from ferflow.models import inference

if TYPE_CHECKING:
    from ferflow.models.export import Exported

REGISTRY_PREFIX = "models:/"
REGISTRY_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
_ARTIFACT_KEYS = {"weights": layout.WEIGHTS, "run_json": layout.RUN_JSON}
WEIGHTS_TAG = "model.weights_sha256"  # ferflow.tracking.packaging.WEIGHTS_TAG, without importing mlflow early


class ModelRefError(ConfigError):
    """A --model reference that names no usable model (exit code 2, like a usage error)."""


def load_reference(ref: str, params: Params, device: torch.device) -> inference.Predictor:
    """The Predictor a model reference names; ModelRefError (naming `ref` and what was
    tried) when it names none."""
    text = ref.strip()
    if text.startswith(REGISTRY_PREFIX):
        return _load_registered(ref, params, device)
    path = Path(text).expanduser()
    from ferflow.models.zoo import ZOO

    is_run = (path / layout.RUN_JSON).is_file() and (path / layout.WEIGHTS).is_file()
    if path.is_dir() and (is_run or text not in ZOO):  # a stray folder `dan/` does not hide zoo model dan
        if not is_run:
            raise ModelRefError(f"model reference {ref!r}: the directory lacks {layout.RUN_JSON} or "
                                f"{layout.WEIGHTS}, so it is not a training run directory (`ferflow train` "
                                "writes both to train.out_dir/<dataset>/<model>)")
        try:
            return inference.load_run(path, device)
        except (FerflowError, ValueError, KeyError, OSError) as exc:  # a broken run.json / weights file
            raise ModelRefError(f"model reference {ref!r}: cannot load the run directory: {_why(exc)}") from None
    return _load_zoo(ref, text, path, params, device)


def _load_zoo(ref: str, name: str, path: Path, params: Params, device: torch.device) -> inference.Predictor:
    from ferflow.models import zoo

    try:
        entry = zoo.resolve(name)
    except FerflowError:
        where = "a file, not a run directory" if path.exists() else "no such directory"
        raise ModelRefError(
            f"model reference {ref!r} names no model: not models:/<name>@<alias> or models:/<name>/<version>, "
            f"not a run directory ({where}), not a zoo model (known: {', '.join(zoo.ZOO)}; see `ferflow models`)"
        ) from None
    why_not = inference.zero_shot_skip_reason(entry, params.weights_for(entry.name).pretrained)
    if why_not:
        raise ModelRefError(f"model reference {ref!r}: zoo model {entry.name} cannot predict zero-shot: {why_not}; "
                            "give a trained run directory or a registered model (models:/<name>@champion)")
    predictor = inference.load_zero_shot(params, entry.name, device)
    if predictor is None:  # zero_shot_skip_reason said yes above; kept for safety
        raise ModelRefError(f"model reference {ref!r}: zoo model {entry.name} has no zero-shot head")
    return predictor


# ---------------------------------------------------------------------------- registry


def _load_registered(ref: str, params: Params, device: torch.device) -> inference.Predictor:
    m = REGISTRY_REF.match(ref.strip())
    if m is None:
        raise ModelRefError(f"model reference {ref!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    from ferflow.tracking import service

    client = service.configure(params)  # FerflowError (exit 1) when the store is unreachable
    uri = service.current_tracking_uri() or ""
    where = service.redact_uri(uri)
    with service.mlflow_errors(f"model reference {ref!r}: reading the registry", where=where):
        _, version = find_version(client, ref, m.group("name"), m.group("alias"), m.group("version"), where)
        folder = _download(ref, version, uri)
    try:
        return inference.load_files(folder / layout.WEIGHTS, folder / layout.RUN_JSON, device)
    except (FerflowError, ValueError, KeyError, OSError) as exc:
        raise ModelRefError(f"model reference {ref!r}: version {version.version} of {version.name} does not "
                            f"load: {_why(exc)}") from None


def find_version(client, ref: str, name: str, alias: str | None, number: str | None, where: str):
    """(registered model, version) that `ref` names (by alias or number): ModelRefError
    (exit 2) naming what is missing; other MLflow errors pass through."""
    from mlflow.exceptions import MlflowException

    from ferflow.tracking import service

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if not service.not_found(exc):
            raise
        try:
            names = sorted(m.name for m in client.search_registered_models(max_results=20))
        except MlflowException:
            names = []
        raise ModelRefError(f"model reference {ref!r}: no registered model named {name!r} at {where}"
                            + (f" (registered: {', '.join(names)})" if names else "")) from None
    if alias is not None:
        if alias not in model.aliases:
            known = ", ".join(f"{a} (v{v})" for a, v in sorted(model.aliases.items())) or "none"
            raise ModelRefError(f"model reference {ref!r}: {name} has no alias {alias!r} at {where} "
                                f"(aliases: {known})")
        number = str(model.aliases[alias])
    try:
        return model, client.get_model_version(name, number)
    except MlflowException as exc:
        if service.not_found(exc):
            raise ModelRefError(f"model reference {ref!r}: {name} has no version {number} at {where}") from None
        raise


def _download(ref: str, version, tracking_uri: str) -> Path:
    """A folder with the version's best.safetensors and run.json, from the cache when it
    holds them with the weights the version records."""
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from ferflow.data.sources import cache_root
    from ferflow.fileio import sha256_file

    key = hashlib.sha256(f"{tracking_uri}\n{version.source}\n{version.name}/{version.version}".encode()).hexdigest()
    folder = cache_root() / "registry" / key[:24]
    expected = (version.tags or {}).get(WEIGHTS_TAG)
    if _complete(folder, expected, sha256_file):
        return folder
    repo = ModelsArtifactRepository(f"models:/{version.name}/{version.version}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".download-", dir=folder.parent))
    try:
        downloads = work / "model"  # MLmodel and the artifacts' own folders; only two files are kept
        downloads.mkdir()
        with _quiet_downloads():
            paths = _artifact_paths(ref, version, Path(repo.download_artifacts("MLmodel", str(downloads))))
            for key_name, file_name in _ARTIFACT_KEYS.items():
                os.replace(repo.download_artifacts(paths[key_name], str(downloads)), work / file_name)
        shutil.rmtree(downloads)
        if expected and sha256_file(work / layout.WEIGHTS) != expected:
            raise ModelRefError(f"model reference {ref!r}: the downloaded weights of {version.name} version "
                                f"{version.version} do not match its {WEIGHTS_TAG} tag {expected[:16]}…")
        shutil.rmtree(folder, ignore_errors=True)  # a stale or partial copy
        try:
            os.replace(work, folder)
        except OSError:  # another process put it there first: theirs is as good
            shutil.rmtree(work, ignore_errors=True)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return folder


def _complete(folder: Path, expected: str | None, sha256_file) -> bool:
    if not all((folder / f).is_file() for f in _ARTIFACT_KEYS.values()):
        return False
    return expected is None or sha256_file(folder / layout.WEIGHTS) == expected


def _artifact_paths(ref: str, version, mlmodel: Path) -> dict[str, str]:
    """Where the model keeps `weights` and `run_json` (MLmodel's python_function flavor)."""
    import yaml

    try:
        flavor = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))["flavors"]["python_function"]
        artifacts = flavor.get("artifacts") or {}
        return {k: str(artifacts[k]["path"]) for k in _ARTIFACT_KEYS}
    except (KeyError, TypeError, AttributeError, yaml.YAMLError):
        raise ModelRefError(f"model reference {ref!r}: {version.name} version {version.version} is not a ferflow "
                            "model (its MLmodel has no python_function artifacts `weights` and `run_json`; "
                            "register it with `ferflow register`)") from None


@contextmanager
def _quiet_downloads() -> Iterator[None]:
    """MLflow's tqdm bars would interleave with predict's own progress on stderr."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    saved = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__



# ---------------------------------------------------------------------------- export


def export_reference(params: Params, ref: str, fmt: str = "onnx", out: Path | None = None,
                     opset: int | None = None) -> "Exported":
    """`ferflow export`: resolve `ref` (models:/name@alias, models:/name/version, a run
    directory or a zoo name) to a Predictor on CPU and export it."""
    from ferflow.models.export import FORMATS, export_onnx
    from ferflow.redact import redact_uri

    if fmt not in FORMATS:
        raise FerflowError(f"export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if opset is not None and opset < 18:
        raise FerflowError(f"--opset {opset}: torch's ONNX exporter needs opset 18 or newer")
    predictor = load_reference(ref, params, torch.device("cpu"))
    weights_sha256, weights_of, extra = _weights_digest(ref, predictor, params)
    out = Path(out) if out is not None else Path(f"{_slug(ref)}.{fmt}")
    return export_onnx(predictor, out, source=redact_uri(str(ref)), weights_sha256=weights_sha256,
                       weights_of=weights_of, opset=opset, extra_metadata=extra)


def _weights_digest(ref: str, predictor: inference.Predictor, params: Params) -> tuple[str | None, str, dict]:
    """What identifies the exported weights (sha256, of what, extra metadata): a run's
    best.safetensors, a registered version's recorded digest, a zoo model's pinned
    checkpoint digest; else (None) a digest of the tensors."""
    from ferflow.fileio import sha256_file

    weights = Path(ref).expanduser() / layout.WEIGHTS
    if weights.is_file():
        return sha256_file(weights), layout.WEIGHTS, {}
    match = REGISTRY_REF.match(ref.strip())
    if match is not None:
        from ferflow.tracking import service

        client = service.configure(params)  # load_reference has just read this version
        version = (client.get_model_version_by_alias(match["name"], match["alias"]) if match["alias"]
                   else client.get_model_version(match["name"], match["version"]))
        extra = {"ferflow.registered_version": f"{version.name}/{version.version}"}
        if version.tags.get(WEIGHTS_TAG):
            return version.tags[WEIGHTS_TAG], layout.WEIGHTS, extra
        return None, "state_dict", extra
    pinned = params.weights_for(predictor.entry.name).sha256
    if predictor.collapse is not None and pinned:
        return pinned, "pretrained checkpoint", {}
    return None, "state_dict", {}


def _slug(ref: str) -> str:
    text = re.sub(r"^models:/", "", str(ref).rstrip("/"))
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"
