"""The MLflow model registry: log a run directory's model, register it, gate promotions.

One registered model per dataset (`registry.names`). Each version carries its lineage and
its evaluation as tags (the metric names of the training run: `eval_accuracy`,
`eval_<dataset>_accuracy`, ...) and a Markdown model card as description. Aliases only
(stages are deprecated since MLflow 2.9):

    challenger          the newest registered version, waiting for `promote`
    champion            the version to serve: `models:/<name>@champion`
    previous-champion   the champion before the last promotion (what `rollback` restores)

Promotion compares a candidate with the champion on the same evaluation data only (the
`eval.manifest_sha256` tag: the prepared in-domain dataset's manifest digest) and records
every decision, promoted or refused, as `promotion.*` tags on the candidate.

`register` never writes into the run directory: when the tracking server is down it fails
with the URI in the message and can be re-run later from the run directory alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Iterator, Optional

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ColSpec, Schema

from ferflow.config import Params
from ferflow.data.sources import sha256_file
from ferflow.errors import FerflowError
from ferflow.tracking import service
from ferflow.redact import redact_text, redact_tree, redact_uri
from ferflow.tracking.runs import EVAL_KEYS

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
RUN_JSON, WEIGHTS, RUN_ID_FILE = "run.json", "best.safetensors", "mlflow_run.json"
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
LOGGED_MODEL_NAME = "model"
WEIGHTS_TAG = "model.weights_sha256"  # sha256 of best.safetensors, on logged models and versions
# model.onnx (ferflow.serving.export) rides in every logged model as the artifact `onnx`, at
# ONNX_PATH inside the model; these tags (on logged models and versions) name it, and
# ENGINE_TAG the runtime recorded in the MLmodel's model_config (serve.engine).
ONNX_PATH = "artifacts/model.onnx"
ONNX_PATH_TAG, ONNX_SHA_TAG, ONNX_OPSET_TAG = "model.onnx.path", "model.onnx.sha256", "model.onnx.opset"
ENGINE_TAG = "serve.engine"

MAX_TAG_VALUE = 5000  # MLflow's limit for model version tag values
# A second job registering the same model waits for the first's ONNX export and logging.
_REGISTER_LOCK_TIMEOUT_S = 1800.0
# What the served model imports (the bundled ferflow code included), pinned to this
# environment so `mlflow models serve --env-manager virtualenv` rebuilds the same one.
REQUIREMENTS = ("torch", "torchvision", "timm", "safetensors", "pillow", "numpy", "pandas", "mlflow",
                "pydantic", "pyyaml", "requests", "onnxruntime")
LICENCE_NOTE = (
    "Fine-tuned on the LFW emotion dataset (Yang, Wu, Hattori, MUM 2020; "
    "KDDI-AI-Center/LFW-emotion-dataset), released for academic / non-commercial use only: "
    "this model inherits that restriction. The base checkpoint keeps its own licence."
)


# ---------------------------------------------------------------------------- connection


def _client(params: Params, retry_hint: str = "") -> MlflowClient:
    """`service.configure`: MLFLOW_TRACKING_URI or tracking.tracking_uri, bounded HTTP
    retries, a quick reachability check (a down server fails in seconds, URI named)."""
    try:
        return service.configure(params)
    except FerflowError as exc:
        raise FerflowError(f"{exc}{retry_hint}") from None


@contextmanager
def _mlflow_errors(what: str, retry_hint: str = "") -> Iterator[None]:
    """MLflow and HTTP failures become one FerflowError naming the (redacted) URI."""
    import requests

    try:
        yield
    except FerflowError:
        raise
    except (MlflowException, requests.RequestException, OSError) as exc:
        message = " ".join((getattr(exc, "message", None) or str(exc)).split())[:500]
        raise FerflowError(
            f"{what} failed at {redact_uri(mlflow.get_tracking_uri())}: {redact_text(message)}{retry_hint}"
        ) from exc


def _not_found(exc: MlflowException) -> bool:
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


# ---------------------------------------------------------------------------- run directory


def _read_run_dir(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    info_path, weights = run_dir / RUN_JSON, run_dir / WEIGHTS
    if not info_path.is_file() or not weights.is_file():
        raise FerflowError(f"{run_dir}: no trained model ({RUN_JSON} / {WEIGHTS} missing); run `ferflow train` first")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise FerflowError(f"{info_path}: not valid JSON ({exc}); re-run `ferflow train`") from None
    missing = [k for k in ("model", "input_size", "classes") if k not in info]
    if missing:
        raise FerflowError(f"{info_path}: missing {', '.join(missing)}; written by an older ferflow? re-run `ferflow train`")
    return info


def _recorded_run_id(run_dir: Path) -> Optional[str]:
    """The MLflow run of training (`runs.MlflowTrainCallback` writes it), if any."""
    from ferflow.tracking.runs import read_run_ref

    ref = read_run_ref(Path(run_dir))
    return str(ref["run_id"]) if ref else None


# ---------------------------------------------------------------------------- logging


def _signature() -> ModelSignature:
    from ferflow.labels import CLASSES

    # `path` is optional beside `image` so that in-process callers can pass files.
    inputs = Schema([ColSpec("string", "image", required=False), ColSpec("string", "path", required=False)])
    outputs = Schema([ColSpec("string", "label")] + [ColSpec("double", f"p_{c}") for c in CLASSES])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _input_example() -> pd.DataFrame:
    """One 8x8 grey PNG: small, and MLflow checks serving with it while logging."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode("ascii")]})


def _requirements() -> list[str]:
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


@contextmanager
def _bundled_code() -> Iterator[str]:
    """A copy of the ferflow package without caches: the model serves the code it was
    logged with, not whatever ferflow is installed where it is loaded."""
    import ferflow

    with tempfile.TemporaryDirectory(prefix="ferflow-code-") as tmp:
        dest = Path(tmp) / "ferflow"
        shutil.copytree(Path(ferflow.__file__).parent, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        yield str(dest)


def _find_logged_model(client: MlflowClient, run_id: str, weights_sha256: str, engine: str = "torch"):
    """A model already logged into the run from these weights and engine, with its ONNX (by an earlier try)."""
    run = client.get_run(run_id)
    for output in run.outputs.model_outputs if run.outputs is not None else []:
        try:
            model = client.get_logged_model(output.model_id)
        except MlflowException:
            continue
        if (model.tags.get(WEIGHTS_TAG) == weights_sha256 and str(model.status).upper().endswith("READY")
                and model.tags.get(ONNX_SHA_TAG) and model.tags.get(ENGINE_TAG, "torch") == engine):
            return model
    return None


def log_model(run_dir: Path, run_id: Optional[str] = None, engine: str = "torch") -> ModelInfo:
    """Log the run directory's model (pyfunc from code, safetensors weights) into a run.

    The run: `run_id`, else the one recorded in `<run_dir>/mlflow_run.json`, else the
    active run, else a new run in MLflow's current experiment. A model already logged
    there from the same weights is reused, so retries do not pile up copies.
    Uses the current tracking URI (`service.configure` sets it). `engine` (serve.engine):
    what `mlflow.pyfunc.load_model` runs, torch or onnxruntime on the logged model.onnx.
    """
    run_dir = Path(run_dir)
    info = _read_run_dir(run_dir)
    run_id = run_id or _recorded_run_id(run_dir)
    if run_id is None:
        active = mlflow.active_run()
        if active is not None:
            run_id = active.info.run_id
        else:
            with mlflow.start_run(run_name=f"{info.get('dataset', 'model')}/{info['model']}") as run:
                mlflow.set_tags({"ferflow.registered_from_run_dir": "true", "ferflow.run_dir": str(run_dir.resolve())})
            run_id = run.info.run_id
    return _log_model(MlflowClient(), run_dir, info, run_id, engine)


def _log_model(client: MlflowClient, run_dir: Path, info: dict, run_id: str, engine: str = "torch") -> ModelInfo:
    weights_sha256 = sha256_file(run_dir / WEIGHTS)
    existing = _find_logged_model(client, run_id, weights_sha256, engine)
    if existing is not None:
        log.info("run %s already holds model %s with these weights; reusing it", run_id, existing.model_id)
        return mlflow.models.get_model_info(f"models:/{existing.model_id}")
    experiment_id = client.get_run(run_id).info.experiment_id
    tags = {WEIGHTS_TAG: weights_sha256, "model.name": str(info["model"]),
            "dataset.name": str(info.get("dataset", "")), "recipe.hash": str(info.get("recipe_hash", ""))}
    with _bundled_code() as code, tempfile.TemporaryDirectory(prefix="ferflow-onnx-") as tmp:
        # Exported (and checked against torch) before anything is created: a model that
        # cannot export fails registration here, with nothing half-logged.
        onnx = _export_onnx(run_dir, weights_sha256, run_id, Path(tmp) / Path(ONNX_PATH).name)
        tags.update({ENGINE_TAG: engine, ONNX_PATH_TAG: ONNX_PATH, ONNX_SHA_TAG: onnx.sha256,
                     ONNX_OPSET_TAG: str(onnx.opset)})
        # Created here, in the run's experiment: left to MLflow, a model logged outside an
        # active run lands in the process's current experiment instead.
        logged = client.create_logged_model(experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run_id, tags=tags)
        return Model.log(
            artifact_path=None, name=LOGGED_MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id, model_id=logged.model_id,
            python_model=str(MODEL_CODE),
            artifacts={**_model_artifacts(run_dir, info, Path(tmp)), "onnx": str(onnx.path)},
            code_paths=[code], signature=_signature(), input_example=_input_example(),
            pip_requirements=_requirements(), model_config={"engine": engine},
        )


def _export_onnx(run_dir: Path, weights_sha256: str, run_id: str, out: Path):
    """model.onnx of the run's model (ferflow.serving.export), on CPU."""
    import torch

    from ferflow.models.inference import load_run
    from ferflow.serving.export import export_onnx

    try:
        return export_onnx(load_run(run_dir, torch.device("cpu")), out, source=f"runs:/{run_id}",
                           weights_sha256=weights_sha256)
    except FerflowError as exc:
        raise FerflowError(f"{run_dir}: not registered, every version carries its model.onnx: {exc}") from exc


def _model_artifacts(run_dir: Path, info: dict, staging: Path) -> dict[str, str]:
    """Weights and run.json; the face detector's weights too when the run was trained on
    detector crops, so the served model crops its inputs the same way.

    run.json is logged as a redacted copy: a run directory written by an older ferflow may
    still hold archive or weights URIs with credentials in them."""
    run_json = staging / RUN_JSON
    run_json.write_text(json.dumps(redact_tree(info), indent=2), encoding="utf-8")
    artifacts = {"weights": str(run_dir / WEIGHTS), "run_json": str(run_json)}
    if str((info.get("preprocess") or {}).get("face_crop", "none")).startswith("detect"):
        from ferflow.config import validate
        from ferflow.data.faces import detector_weights

        params = validate(info["params"], origin=str(run_dir / RUN_JSON))
        artifacts["detector"] = str(detector_weights(params.prepare.detector, params.fetch))
    return artifacts


# ---------------------------------------------------------------------------- register


@dataclass(frozen=True)
class _Evaluation:
    metrics: dict  # eval_<metric> (in-domain) and eval_<dataset>_<metric>, as runs.py logs them
    tags: dict  # eval.split, eval.datasets, eval.manifest_sha256, eval.<dataset>.manifest_sha256

    @property
    def datasets(self) -> list[str]:
        return [d for d in self.tags.get("eval.datasets", "").split(",") if d]

    def per_dataset(self) -> dict[str, dict]:
        return _per_dataset(self.metrics, self.datasets)


def _per_dataset(values: dict, datasets: list[str]) -> dict[str, dict]:
    out = {}
    for ds in datasets:
        found = {}
        for metric in EVAL_KEYS:
            try:
                found[metric] = float(values[f"eval_{ds}_{metric}"])
            except (KeyError, ValueError):
                continue
        if "accuracy" in found:
            out[ds] = found
    return out


def register(params: Params, dataset: str, run_dir: Path) -> ModelVersion:
    """Register the model of `run_dir` (trained on `dataset`) as a new version with lineage
    and evaluation tags and a model card, and point `challenger` at it.

    Idempotent per registration: a version of the same training run (the MLflow run the run
    directory records, else the run directory itself) with the same weights, evaluated on
    the same data, in the same DVC trial (or none) is returned as it is, also when two jobs
    register at once (`_registering`). Another run with equal weights (a `dvc exp run`
    trial that ended where the baseline did) gets its own version: a version's tags are
    one run's lineage and trial. The MLflow run is the one recorded in the run directory; when it cannot be
    found (another server, deleted) a new run is created in `tracking.experiment` and
    tagged `ferflow.registered_from_run_dir`. Evaluation comes from the evaluate stage's
    files (`evaluate.out_dir`), else from the run's `eval_*` metrics.
    """
    run_dir = Path(run_dir)
    params.data.check_dataset(dataset)  # a clear error for an unknown dataset
    info = _read_run_dir(run_dir)
    if info.get("dataset") not in (None, dataset):
        raise FerflowError(f"{run_dir}: trained on {info['dataset']!r}, not {dataset!r}; pass --dataset {info['dataset']}")
    model = str(info["model"])
    on_disk = _evaluation_files(params, dataset, model)
    weights_sha256 = sha256_file(run_dir / WEIGHTS)
    name = params.registry.name_for(dataset)
    hint = f"; nothing was written to {run_dir}: re-run `ferflow register` when MLflow is back"
    client = _client(params, hint)
    key = _RegistrationKey.of(run_dir, weights_sha256)
    with _mlflow_errors(f"registering {run_dir} as {name}", hint), _registering(name):
        if on_disk is not None:  # checked before a stand-in run is made for nothing
            existing = _same_version(client, name, key, on_disk.tags)
            if existing is not None:
                log.info("%s version %s already holds this run's weights with this evaluation", name, existing.version)
                return _complete(client, existing)
        run = _source_run(client, params, dataset, run_dir, info, on_disk)
        evaluation = on_disk or _evaluation_from_run(run, dataset, model)
        tags = _version_tags(params, info, dataset, run_dir, run, evaluation, weights_sha256)
        existing = _same_version(client, name, key, tags)
        if existing is not None:
            log.info("%s version %s already holds this run's weights with this evaluation; not registering again",
                     name, existing.version)
            return _complete(client, existing)
        model_info = _log_model(client, run_dir, info, run.info.run_id, params.serve.engine)
        logged_tags = client.get_logged_model(model_info.model_id).tags
        tags.update({k: logged_tags[k] for k in (ENGINE_TAG, ONNX_PATH_TAG, ONNX_SHA_TAG, ONNX_OPSET_TAG)
                     if k in logged_tags})
        _ensure_registered_model(client, name, dataset)
        version = client.create_model_version(
            name, source=model_info.model_uri, run_id=run.info.run_id, tags=tags,
            description=model_card(name, info, dataset, tags, evaluation), model_id=model_info.model_id,
        )
        first = _same_version(client, name, key, tags)
        if first is not None and str(first.version) != str(version.version):
            # Another job registered the same between our check and our create (only without
            # the lock: tracking servers). Version numbers grow in creation order, so of two
            # such jobs only the later sees the other's and withdraws its own.
            _withdraw(client, version, model_info.model_id, first)
            log.info("%s version %s was registered from this run at the same time; using it", name, first.version)
            return _complete(client, first)
        client.set_registered_model_alias(name, CHALLENGER, version.version)
        log.info("registered %s version %s (alias %s)", name, version.version, CHALLENGER)
        return client.get_model_version(name, version.version)


@contextmanager
def _registering(name: str) -> Iterator[None]:
    """Serialise check-then-register of `name` between jobs on one embedded sqlite store,
    with a lock beside its database (held through the model's logging: a second job waits,
    then finds the first's version). Tracking servers get no lock (none spans hosts):
    `register` re-checks after creating its version instead."""
    from ferflow.locks import file_lock, lock_name

    path = service.store_lock_path(service.current_tracking_uri() or "", "register-" + lock_name(name))
    if path is None:
        yield
        return
    with file_lock(path, f"registering {name}", _REGISTER_LOCK_TIMEOUT_S):
        yield


def _withdraw(client: MlflowClient, version: ModelVersion, model_id: str, kept: ModelVersion) -> None:
    """Delete a duplicate version, and the model logged for it unless `kept` uses it too."""
    client.delete_model_version(version.name, version.version)
    # Versions made from a logged model have source models:/<model_id> (their model_id is unset).
    if model_id not in (getattr(kept, "model_id", None), str(kept.source).rsplit("/", 1)[-1]):
        try:
            client.delete_logged_model(model_id)
        except MlflowException as exc:  # a leftover model in the run is untidy, not wrong
            log.warning("could not delete duplicate logged model %s: %s", model_id, service.describe_error(exc))


def _complete(client: MlflowClient, version: ModelVersion) -> ModelVersion:
    """A version left without alias or decision by an interrupted register becomes challenger."""
    if not version.aliases and "promotion.decision" not in version.tags:
        client.set_registered_model_alias(version.name, CHALLENGER, version.version)
        return client.get_model_version(version.name, version.version)
    return version


def _source_run(client, params: Params, dataset: str, run_dir: Path, info: dict, evaluation: Optional[_Evaluation]):
    """The training run recorded in the run dir, or a new run standing in for it."""
    run_id = _recorded_run_id(run_dir)
    if run_id is not None:
        try:
            run = client.get_run(run_id)
            if run.info.lifecycle_stage == "active":
                return run
            log.warning("MLflow run %s of %s is deleted; logging into a new run", run_id, run_dir)
        except MlflowException as exc:
            if not _not_found(exc):
                raise
            log.warning("MLflow run %s of %s is not in %s; logging into a new run",
                        run_id, run_dir, redact_uri(mlflow.get_tracking_uri()))
    tags = {"ferflow.registered_from_run_dir": "true", "ferflow.run_dir": str(run_dir.resolve()),
            "ferflow.original_run_id": run_id or "none"}
    try:
        from ferflow.tracking.lineage import lineage_tags

        tags = {**lineage_tags(params, dataset, str(info["model"]), run_dir, stage="register"), **tags}
    except Exception as exc:  # noqa: BLE001 - lineage is best effort; run.json tags follow anyway
        log.warning("lineage tags unavailable: %s", exc)
    if evaluation is not None:
        tags.update(evaluation.tags)
    experiment_id = service.current_experiment_id()
    run = client.create_run(experiment_id, run_name=f"{dataset}/{info['model']}", tags=tags)
    try:
        values = {f"train_{k}": v for k, v in _train_metrics(run_dir).items()}
        values.update(evaluation.metrics if evaluation is not None else {})
        now = _now_ms()
        client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in sorted(values.items())])
        client.set_terminated(run.info.run_id, "FINISHED")
    except Exception:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    return client.get_run(run.info.run_id)


def _ensure_registered_model(client: MlflowClient, name: str, dataset: str) -> None:
    try:
        client.create_registered_model(
            name, tags={"dataset.name": dataset},
            description=f"3-class facial-expression models (negative / neutral / positive) fine-tuned on {dataset}.",
        )
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


@dataclass(frozen=True)
class _RegistrationKey:
    """What makes two registrations the same, besides the evaluation data: the training
    run, the weights, the DVC trial (tags as `_version_tags` writes them)."""

    weights_sha256: str
    run_id: Optional[str]  # recorded in the run directory (mlflow_run.json)
    run_dir: str  # stands for the run when none is recorded
    experiment: str  # dvc.experiment, "" outside a trial

    @classmethod
    def of(cls, run_dir: Path, weights_sha256: str) -> "_RegistrationKey":
        return cls(weights_sha256, _recorded_run_id(run_dir), _tag_text(Path(run_dir).resolve()),
                   _tag_text(dvc_experiment()))

    def matches(self, version: ModelVersion, evaluation_tags: dict) -> bool:
        tags = version.tags
        if tags.get(WEIGHTS_TAG) != self.weights_sha256 or tags.get(EXPERIMENT_TAG, "") != self.experiment:
            return False
        if any(tags.get(k) != evaluation_tags.get(k) for k in ("eval.manifest_sha256", "eval.split")):
            return False
        if self.run_id is not None:  # that run, or the stand-in made when it was missing
            return self.run_id in (tags.get("source_run_id"), tags.get("ferflow.original_run_id"))
        return tags.get("ferflow.original_run_id") == "none" and tags.get("ferflow.run_dir") == self.run_dir


def _tag_text(value) -> str:
    """A value as it is stored in a version tag (`_version_tags`)."""
    return redact_text(str(value))[:MAX_TAG_VALUE]


def _same_version(client, name: str, key: _RegistrationKey, evaluation_tags: dict) -> Optional[ModelVersion]:
    """The first (lowest) version registered for `key` evaluated like `evaluation_tags`."""
    for version in _versions(client, name):
        if key.matches(version, evaluation_tags):
            return client.get_model_version(name, version.version)
    return None


def _versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if _not_found(exc):
            return []
        raise
    found, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return sorted(found, key=lambda v: int(v.version))


# ---------------------------------------------------------------------------- evaluation


def _evaluation_files(params: Params, dataset: str, model: str) -> Optional[_Evaluation]:
    """The evaluate stage's summary (`<model>.json`) and per-dataset metrics.json, named
    like the training run's metrics (`runs.evaluation_records`); None when not evaluated."""
    from ferflow.evaluation.evaluate import summary_path
    from ferflow.tracking.runs import evaluation_records

    root = params.evaluate.out_dir / "fine-tuned" / dataset / model
    summary = summary_path(root)
    if not summary.is_file():
        return None
    try:
        data = json.loads(summary.read_text(encoding="utf-8"))
        metrics, tags = evaluation_records(params, dataset, data, root)
    except (ValueError, AttributeError, TypeError) as exc:
        raise FerflowError(f"{summary}: unreadable evaluation summary ({exc}); re-run `ferflow evaluate`") from None
    if "eval_accuracy" not in metrics:
        raise FerflowError(f"{summary}: no in-domain ({dataset}) result; run `ferflow evaluate` with {dataset} included")
    return _Evaluation(metrics, tags)


def _evaluation_from_run(run, dataset: str, model: str) -> _Evaluation:
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("eval_")}
    tags = {k: v for k, v in run.data.tags.items() if k.startswith("eval.")}
    if "eval_accuracy" not in metrics:
        raise FerflowError(
            f"no evaluation of {model} trained on {dataset}: no evaluation files under evaluate.out_dir and no "
            f"eval_accuracy in MLflow run {run.info.run_id}; run `ferflow evaluate --dataset {dataset} --model {model}`"
        )
    tags.setdefault("eval.datasets", dataset)
    return _Evaluation(metrics, tags)


def _train_metrics(run_dir: Path) -> dict:
    try:
        data = json.loads((Path(run_dir) / "train_metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _version_tags(params: Params, info: dict, dataset: str, run_dir: Path, run, evaluation: _Evaluation,
                  weights_sha256: str) -> dict[str, str]:
    """Lineage now, then the training run's own tags (lineage at training time), then what
    run.json and the weights say, then the evaluation: later sources win."""
    tags: dict[str, str] = {}
    try:
        from ferflow.tracking.lineage import lineage_tags

        tags.update(lineage_tags(params, dataset, str(info["model"]), run_dir, stage="register"))
    except Exception as exc:  # noqa: BLE001 - lineage is best effort beside run.json
        log.warning("lineage tags unavailable: %s", exc)
    registering_run = tags.get("kfp.run_id", "none")
    for key, value in run.data.tags.items():
        if key == "mlflow.source.git.commit":
            tags.setdefault("git.commit", value)
        elif not key.startswith("mlflow."):
            tags[key] = value
    if registering_run != "none":
        # The KFP run that registered this version; a cached training came from an earlier one.
        trained_in = run.data.tags.get("kfp.run_id", "none")
        if trained_in not in ("none", registering_run):
            tags["kfp.train_run_id"] = trained_in
        tags["kfp.run_id"] = registering_run
    tags.update({
        "model.name": str(info["model"]), "model.arch": str(info.get("arch", "")),
        "model.input_size": str(info["input_size"]), "model.classes": ",".join(info["classes"]),
        "model.base_checkpoint": redact_uri(str(info.get("weights_source") or "none")),
        "model.base_sha256": str(info.get("weights_sha256") or "none"), WEIGHTS_TAG: weights_sha256,
        "dataset.name": dataset, "recipe.hash": str(info.get("recipe_hash") or tags.get("recipe.hash", "")),
        "ferflow.version": str(info.get("ferflow_version") or tags.get("ferflow.version", "")),
        "source_run_id": run.info.run_id,
    })
    tags.update(evaluation.tags)
    tags.update({k: _number_text(v) for k, v in evaluation.metrics.items()})
    experiment = dvc_experiment()
    if experiment:
        tags[EXPERIMENT_TAG] = experiment[:MAX_TAG_VALUE]
    if tags.get("eval.manifest_sha256", "unknown") == "unknown":
        raise FerflowError(
            f"{params.data.prepared_dir / dataset / 'report.json'}: no manifest_sha256 to identify the evaluation "
            f"data, so the promotion gate could not compare this version; run `ferflow prepare --dataset {dataset}`"
        )
    tags.setdefault("eval.split", params.evaluate.split)
    return {k: redact_text(str(v))[:MAX_TAG_VALUE] for k, v in tags.items() if v not in (None, "")}


def _number_text(value) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) >= 1 else repr(value)


def _now_ms() -> int:
    return int(datetime.now(timezone.utc).timestamp() * 1000)


# ---------------------------------------------------------------------------- model card


def model_card(name: str, info: dict, dataset: str, tags: dict, evaluation: _Evaluation) -> str:
    """A short Markdown model card: what it is, how it did, what it is for."""
    base, base_sha = tags.get("model.base_checkpoint", "none"), tags.get("model.base_sha256", "none")
    per = evaluation.per_dataset()
    rows = []
    for eval_ds in sorted(per, key=lambda d: (d != dataset, d)):
        m = per[eval_ds]
        rows.append(f"| {eval_ds}{' (in-domain)' if eval_ds == dataset else ''} | {_pct(m.get('accuracy'))} | "
                    f"{_pct(m.get('macro_f1'))} | {_pct(m.get('balanced_accuracy'))} | "
                    f"{_pct(m.get('baseline_accuracy'))} | {_delta_pct(m.get('accuracy'), m.get('baseline_accuracy'))} | "
                    f"{_pct(m.get('baseline_macro_f1'))} | {_delta_pct(m.get('macro_f1'), m.get('baseline_macro_f1'))} | "
                    f"{int(m.get('n', 0)) or '–'} |")
    return "\n".join([
        f"# {name}: `{info['model']}` fine-tuned on {dataset}",
        "",
        "Facial-expression classifier with three classes: " + ", ".join(info["classes"]) + ".",
        "",
        "| | |",
        "|---|---|",
        f"| model | `{info['model']}` (architecture `{tags.get('model.arch', '?')}`, input {info['input_size']} px) |",
        f"| base checkpoint | {base}" + (f" (sha256 `{base_sha[:16]}…`)" if base_sha != "none" else "") + " |",
        f"| training data | {dataset} (archive sha256 `{tags.get('dataset.archive_sha256', '?')[:16]}…`) |",
        f"| recipe | `{tags.get('recipe.hash', '?')}` (ferflow {tags.get('ferflow.version', '?')}, "
        f"git `{tags.get('git.commit', '?')[:12]}`) |",
        f"| weights | sha256 `{tags[WEIGHTS_TAG][:16]}…` |",
        *([f"| ONNX | `{tags[ONNX_PATH_TAG]}` of this version's model (sha256 `{tags[ONNX_SHA_TAG][:16]}…`, "
            f"opset {tags.get(ONNX_OPSET_TAG, '?')}): uint8 RGB NCHW in, probabilities out; "
            f"served by {tags.get(ENGINE_TAG, 'torch')} |"] if ONNX_SHA_TAG in tags else []),
        f"| source run | `{tags['source_run_id']}` |",
        "",
        f"## Evaluation ({tags.get('eval.split', 'eval')} split, data manifest `{tags['eval.manifest_sha256'][:16]}…`)",
        "",
        "Zero-shot: the base checkpoint's own expression head mapped to the three classes, on the "
        "same images: the starting point this model must beat to be promoted.",
        "",
        "| evaluated on | accuracy % | macro F1 % | balanced accuracy % | zero-shot accuracy % | Δ accuracy | "
        "zero-shot macro F1 % | Δ macro F1 | images |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "## Intended use",
        "",
        "Research and benchmarking of facial-expression recognition on face images like LFW's "
        "(one face per image, RGB). Input: a DataFrame column `image` with base64-encoded image "
        "bytes; output: `label` and `p_<class>` probabilities. Not for decisions about people: "
        "expressions are not emotions, and accuracy drops on other data (see the cross-dataset rows).",
        "",
        "## Licence",
        "",
        LICENCE_NOTE,
        "",
    ])


def _pct(value) -> str:
    return "–" if value is None else f"{100.0 * float(value):.2f}"


def _delta_pct(value, start) -> str:
    return "–" if value is None or start is None else f"{100.0 * (float(value) - float(start)):+.2f}"


# ---------------------------------------------------------------------------- promotion


@dataclass(frozen=True)
class PromotionDecision:
    """What `promote` or `rollback` decided, also written as `promotion.*` version tags."""

    name: str
    action: str  # "promoted" | "refused" | "rolled-back" | "skipped" (a DVC experiment trial)
    reason: str
    at: str  # ISO 8601, UTC
    metric: str
    min_delta: float
    candidate_version: Optional[str] = None
    candidate_value: Optional[float] = None
    champion_version: Optional[str] = None  # before the decision
    champion_value: Optional[float] = None
    manifest_sha256: Optional[str] = None

    @property
    def promoted(self) -> bool:
        return self.action in ("promoted", "rolled-back")

    @property
    def champion_after(self) -> Optional[str]:
        return self.candidate_version if self.promoted else self.champion_version

    def tags(self) -> dict[str, str]:
        values = {
            "promotion.decision": self.action, "promotion.reason": self.reason, "promotion.at": self.at,
            "promotion.metric": self.metric, "promotion.min_delta": repr(self.min_delta),
            "promotion.candidate_value": _opt(self.candidate_value),
            "promotion.champion_version": self.champion_version or "none",
            "promotion.champion_value": _opt(self.champion_value),
        }
        return {k: v[:MAX_TAG_VALUE] for k, v in values.items()}

    def as_dict(self) -> dict:
        return {**asdict(self), "promoted": self.promoted, "champion_after": self.champion_after}


def _opt(value: Optional[float]) -> str:
    return "none" if value is None else repr(float(value))


def _metric(version: ModelVersion, metric: str) -> Optional[float]:
    try:
        value = float(version.tags[metric])
    except (KeyError, ValueError):
        return None
    return None if math.isnan(value) else value


# DVC names the experiment in the environment of the stages `dvc exp run` runs.
DVC_EXPERIMENT_ENV = "DVC_EXP_NAME"
EXPERIMENT_TAG = "dvc.experiment"


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    """alias -> version number, as text (MLflow gives ints in some entities, strings in others)."""
    return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}


def dvc_experiment() -> str:
    """The name of the `dvc exp run` trial this process runs in; "" outside one."""
    return os.environ.get(DVC_EXPERIMENT_ENV, "").strip()


def promote(params: Params, name: str, metric: Optional[str] = None, min_delta: Optional[float] = None,
            *, force: bool = False) -> PromotionDecision:
    """Move `champion` to the best candidate if it beats the champion on `metric`.

    Candidates: the `challenger` version and every version newer than the champion (two
    registrations racing for the `challenger` alias both count), except versions a
    rollback demoted. They are compared with the champion only when evaluated on the
    same data (`eval.manifest_sha256` and `eval.split` tags); a challenger evaluated on
    other data is refused as not comparable. The best must be strictly better, by at
    least `min_delta`. Without a champion, the best candidate evaluated on the newest
    candidate's data is promoted. `force` skips the gate for the challenger (after a data
    change, say); it is still recorded. Metric and delta default to `registry.metric` /
    `registry.min_delta`. The decision is written as `promotion.*` tags on the candidate.
    """
    metric = metric or params.registry.metric
    min_delta = params.registry.min_delta if min_delta is None else float(min_delta)
    client = _client(params)
    experiment = dvc_experiment()
    if experiment and not params.registry.promote_in_experiments and not force:
        # A trial is registered (tagged with its name) for comparison, never served.
        with _mlflow_errors(f"promoting {name}"):
            aliases = _aliases(client, name)
        return PromotionDecision(
            name=name, action="skipped", at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            metric=metric, min_delta=min_delta, champion_version=aliases.get(CHAMPION),
            reason=f"DVC experiment {experiment!r}: trials never move {CHAMPION} "
                   "(set registry.promote_in_experiments: true, or pass --force)")
    with _mlflow_errors(f"promoting {name}"):
        versions = _versions(client, name)
        if not versions:
            raise FerflowError(f"no registered model {name!r} (or no versions) at {mlflow.get_registry_uri()}; "
                               "run `ferflow register` first")
        aliases = _aliases(client, name)
        # Versions are ints in some MLflow entities and strings in aliases: compare as text.
        by_number = {str(v.version): v for v in versions}
        champion = by_number.get(aliases.get(CHAMPION, ""))
        challenger = by_number.get(aliases.get(CHALLENGER, ""))
        if challenger is champion:
            challenger = None
        candidates = [v for v in versions if v is challenger or (
            v is not champion and "rollback.demoted_at" not in v.tags
            and (champion is None or int(v.version) > int(champion.version)))]
        decision = _decide(name, champion, challenger, candidates, metric, min_delta, force)
        if decision.candidate_version is None:
            return decision  # nothing to tag
        if decision.promoted:
            if champion is not None:
                client.set_registered_model_alias(name, PREVIOUS, champion.version)
                client.set_model_version_tag(name, champion.version, "promotion.replaced_by", decision.candidate_version)
                client.set_model_version_tag(name, champion.version, "promotion.replaced_at", decision.at)
            client.set_registered_model_alias(name, CHAMPION, decision.candidate_version)
            if challenger is not None:
                client.delete_registered_model_alias(name, CHALLENGER)
                if str(challenger.version) != decision.candidate_version:
                    # It lost to another candidate (two registrations raced for the alias).
                    passed_over = PromotionDecision(**{
                        **asdict(decision), "action": "refused", "candidate_version": str(challenger.version),
                        "candidate_value": _metric(challenger, metric), "manifest_sha256": _data_key(challenger)[0],
                        "reason": f"v{decision.candidate_version} was promoted instead: {decision.reason}"})
                    for key, value in passed_over.tags().items():
                        client.set_model_version_tag(name, challenger.version, key, value)
        for key, value in decision.tags().items():
            client.set_model_version_tag(name, decision.candidate_version, key, value)
        log.info("%s: %s version %s: %s", name, decision.action, decision.candidate_version, decision.reason)
        return decision


def _decide(name: str, champion, challenger, candidates: list, metric: str, min_delta: float,
            force: bool) -> PromotionDecision:
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    base = dict(name=name, at=at, metric=metric, min_delta=min_delta)
    champ_value = _metric(champion, metric) if champion is not None else None
    if champion is not None:
        base.update(champion_version=str(champion.version), champion_value=champ_value)

    def verdict(action: str, version, value, reason: str) -> PromotionDecision:
        return PromotionDecision(action=action, candidate_version=str(version.version), candidate_value=value,
                                 manifest_sha256=_data_key(version)[0], reason=reason, **base)

    scored = [(v, _metric(v, metric)) for v in candidates]
    if challenger is not None and _metric(challenger, metric) is None:
        return verdict("refused", challenger, None, f"challenger has no {metric!r} tag; was it evaluated?")
    scored = [(v, value) for v, value in scored if value is not None]
    if not force:
        # A fine-tuned model must beat the checkpoint it started from, whatever the champion is.
        if challenger is not None and (why := below_starting_point(challenger)):
            return verdict("refused", challenger, _metric(challenger, metric), why + "; promote with --force to override")
        below = [v for v, _ in scored if below_starting_point(v)]
        scored = [s for s in scored if s[0] not in below]
        if not scored and below:
            return verdict("refused", below[-1], _metric(below[-1], metric),
                           below_starting_point(below[-1]) + "; promote with --force to override")
    if not scored:
        return PromotionDecision(action="refused", reason="no candidate: no challenger and no evaluated version "
                                 "newer than the champion", **base)
    if force:
        target = next((s for s in scored if s[0] is challenger), None) or _best_on_newest_data(scored)
        return verdict("promoted", target[0], target[1],
                       f"forced: gate skipped (champion {_vname(champion)} {metric} {_fmt(champ_value)})")
    if champion is None:
        best, value = _best_on_newest_data(scored)
        pool = sum(_data_key(v) == _data_key(best) for v, _ in scored)
        return verdict("promoted", best, value, f"no champion: best {metric} {value:.6g} among {pool} "
                       f"candidate(s) evaluated on manifest {_data_key(best)[0][:12]}")
    champ_key = _data_key(champion)
    if challenger is not None and _data_key(challenger) != champ_key:
        other = _data_key(challenger)
        return verdict("refused", challenger, _metric(challenger, metric), (
            f"not comparable: champion v{champion.version} was evaluated on manifest {champ_key[0][:12]} "
            f"({champ_key[1]} split), challenger v{challenger.version} on {other[0][:12]} ({other[1]} split); "
            "register the champion's weights evaluated on the new data, or promote with force"))
    comparable = [s for s in scored if _data_key(s[0]) == champ_key]
    if not comparable:
        return PromotionDecision(action="refused", reason=(
            f"no candidate evaluated on the champion's data (manifest {champ_key[0][:12]}, {champ_key[1]} split)"),
            **base)
    best, value = max(comparable, key=lambda s: (s[1], int(s[0].version)))
    if champ_value is None:
        return verdict("promoted", best, value, f"champion v{champion.version} has no {metric!r} tag to defend")
    won = value - champ_value > 0 and value - champ_value >= min_delta
    if not won and challenger is not None:  # all lost: report on the version that was asked about
        best, value = challenger, _metric(challenger, metric)
    delta = value - champ_value
    return verdict("promoted" if won else "refused", best, value, (
        f"{metric} {value:.6g} {'beats' if won else 'does not beat'} champion v{champion.version} "
        f"({champ_value:.6g}) on the same data: delta {delta:+.6g}, needed > 0 and >= min_delta {min_delta:g}"))


def below_starting_point(version) -> Optional[str]:
    """Why a version may not be promoted on its own merits: its in-domain eval accuracy is
    below the zero-shot accuracy of its base checkpoint on the same eval split; else None."""
    value, start = _metric(version, "eval_accuracy"), _metric(version, "eval_baseline_accuracy")
    if value is None or start is None or value >= start:
        return None
    return (f"v{version.version} eval accuracy {value:.4f} is below its starting point: the base checkpoint "
            f"{version.tags.get('model.name', '')} zero-shot scores {start:.4f} on the same eval split "
            f"({value - start:+.4f})")


def _best_on_newest_data(scored: list) -> tuple:
    """The best candidate among those evaluated like the newest one: older data is stale."""
    newest = max(scored, key=lambda s: int(s[0].version))[0]
    pool = [s for s in scored if _data_key(s[0]) == _data_key(newest)]
    return max(pool, key=lambda s: (s[1], int(s[0].version)))


def _vname(version) -> str:
    return f"v{version.version}" if version is not None else "none"


def _data_key(version: ModelVersion) -> tuple[str, str]:
    return version.tags.get("eval.manifest_sha256", "unknown"), version.tags.get("eval.split", "eval")


def _fmt(value: Optional[float]) -> str:
    return "none" if value is None else f"{value:.6g}"


def rollback(params: Params, name: str) -> PromotionDecision:
    """Swap `champion` and `previous-champion`; recorded as tags on both versions."""
    client = _client(params)
    with _mlflow_errors(f"rolling back {name}"):
        try:
            aliases = client.get_registered_model(name).aliases
        except MlflowException as exc:
            if _not_found(exc):
                raise FerflowError(f"no registered model {name!r} at {mlflow.get_registry_uri()}") from None
            raise
        current, previous = (str(aliases[a]) if a in aliases else None for a in (CHAMPION, PREVIOUS))
        if current is None or previous is None:
            raise FerflowError(f"{name}: nothing to roll back to (champion: {current or 'none'}, "
                               f"previous-champion: {previous or 'none'})")
        metric = params.registry.metric
        restored, demoted = client.get_model_version(name, previous), client.get_model_version(name, current)
        decision = PromotionDecision(
            name=name, action="rolled-back", at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            metric=metric, min_delta=0.0, candidate_version=previous, candidate_value=_metric(restored, metric),
            champion_version=current, champion_value=_metric(demoted, metric),
            manifest_sha256=restored.tags.get("eval.manifest_sha256"),
            reason=f"rollback: v{previous} restored as champion, v{current} becomes previous-champion",
        )
        client.set_registered_model_alias(name, CHAMPION, previous)
        client.set_registered_model_alias(name, PREVIOUS, current)
        for key, value in decision.tags().items():
            client.set_model_version_tag(name, previous, key, value)
        client.set_model_version_tag(name, current, "rollback.demoted_at", decision.at)
        client.set_model_version_tag(name, current, "rollback.replaced_by", previous)
        log.info("%s: %s", name, decision.reason)
        return decision


# ---------------------------------------------------------------------------- report


def registry_results(params: Params) -> pd.DataFrame:
    """The long results table of `ferflow.evaluation.report.collect_results`, built from
    the registry: per registered model (one per dataset) and zoo model, the champion if it
    is that zoo model, else its newest version."""
    from ferflow.evaluation.report import COLUMNS

    client = _client(params)
    rows, baselines = [], {}
    with _mlflow_errors("reading the registry"):
        for dataset in params.data.datasets:
            name = params.registry.name_for(dataset)
            versions = _versions(client, name)
            if not versions:
                continue
            champion = str(client.get_registered_model(name).aliases.get(CHAMPION))
            chosen: dict[str, ModelVersion] = {}
            for version in versions:  # ascending: the newest wins unless the champion holds the model
                model = version.tags.get("model.name")
                if model and not (model in chosen and str(chosen[model].version) == champion):
                    chosen[model] = version
            for model, version in sorted(chosen.items()):
                train_dataset = version.tags.get("dataset.name", dataset)
                datasets = [d for d in version.tags.get("eval.datasets", "").split(",") if d]
                for eval_ds, m in sorted(_per_dataset(version.tags, datasets).items()):
                    rows.append({"stage": "fine-tuned", "model": model, "train_dataset": train_dataset,
                                 "eval_dataset": eval_ds, "accuracy": m["accuracy"],
                                 "macro_f1": m.get("macro_f1", math.nan),
                                 "balanced_accuracy": m.get("balanced_accuracy", math.nan), "n": int(m.get("n", 0))})
                    if "baseline_accuracy" in m:  # the starting point recorded with this version
                        baselines[(model, eval_ds)] = {
                            "stage": "zero-shot", "model": model, "train_dataset": "none", "eval_dataset": eval_ds,
                            "accuracy": m["baseline_accuracy"], "macro_f1": m.get("baseline_macro_f1", math.nan),
                            "balanced_accuracy": math.nan, "n": int(m.get("n", 0))}
    rows.extend(baselines[k] for k in sorted(baselines))
    return pd.DataFrame(rows, columns=COLUMNS)
