"""Registering a run directory's model as a new version of its dataset's registered model
(`registry.names`): lineage and evaluation as tags, the model card as description, and the
`challenger` alias on it, waiting for `aliases.promote`.

Idempotent per registration (`RegistrationKey`): the same training run and weights,
evaluated on the same data, in the same DVC trial (or none), give one version, also when
two jobs register at once (a lock on an embedded sqlite store, a re-check on a server).
`register` never writes into the run directory: when the tracking server is down it fails
with the URI in the message and can be re-run later from the run directory alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from ferflow import layout
from ferflow.config import Params
from ferflow.errors import ConfigError, FerflowError
from ferflow.fileio import sha256_file
from ferflow.redact import redact_uri
from ferflow.tracking import service
from ferflow.tracking.card import model_card
from ferflow.tracking.lineage import EXPERIMENT_TAG, dvc_experiment, lineage_tags
from ferflow.tracking.packaging import MODEL_TAGS, WEIGHTS_TAG, log_into_run
from ferflow.tracking.payload import number_text, run_metrics, version_tag
from ferflow.tracking.promotion import CHALLENGER
from ferflow.tracking.queries import Evaluation, evaluation_files, evaluation_from_run, versions
from ferflow.tracking.rundir import read_run_dir, recorded_run_id, train_metrics

log = logging.getLogger(__name__)

# A second job registering the same model waits for the first's ONNX export and logging.
REGISTER_LOCK_TIMEOUT_S = 1800.0


class RegisteredVersion(ModelVersion):
    """What `register` returns: the version, and whether this call `created` it or found the
    same registration made before (then it holds whatever aliases it has now, maybe none)."""

    def __init__(self, version: ModelVersion, created: bool):
        self.__dict__.update(vars(version))  # a copy of the entity as MLflow returned it
        self.created = created


def require_log_model(params: Params, run_dir: Path) -> None:
    """A registered version is the model logged into its run: none without `tracking.log_model`."""
    if not params.tracking.log_model:
        raise ConfigError(f"tracking.log_model is false, so {run_dir} cannot be registered: a registered version "
                          "is the model logged to MLflow; set tracking.log_model=true to register it")


def register(params: Params, dataset: str, run_dir: Path) -> RegisteredVersion:
    """Register the model of `run_dir` (trained on `dataset`) as a new version with lineage
    and evaluation tags and a model card, and point `challenger` at it.

    Idempotent per registration: a version of the same training run (the MLflow run the run
    directory records, else the run directory itself) with the same weights, evaluated on
    the same data, in the same DVC trial (or none) is returned as it is, `created` false,
    also when two jobs register at once (`_registering`). Another run with equal weights (a
    `dvc exp run` trial that ended where the baseline did) gets its own version: a version's
    tags are one run's lineage and trial. The MLflow run is the one recorded in the run
    directory; when it cannot be found (another server, deleted) a new run is created in
    `tracking.experiment` and tagged `ferflow.registered_from_run_dir`. Evaluation comes
    from the evaluate stage's files (`evaluate.out_dir`), else from the run's `eval_*` metrics.

    `tracking.log_model: false` refuses (ConfigError) before anything is read or written:
    a version is made from the model logged into the run, so there is no version without it.
    """
    require_log_model(params, run_dir)
    run_dir = Path(run_dir)
    params.data.check_dataset(dataset)  # a clear error for an unknown dataset
    info = read_run_dir(run_dir)
    if info.get("dataset") not in (None, dataset):
        raise FerflowError(f"{run_dir}: trained on {info['dataset']!r}, not {dataset!r}; pass --dataset {info['dataset']}")
    model = str(info["model"])
    on_disk = evaluation_files(params, dataset, model)
    # Before MLflow is contacted: a stand-in run must not be made for a register that fails.
    if on_disk is None and recorded_run_id(run_dir) is None:
        raise FerflowError(f"no evaluation of {model} trained on {dataset}: {run_dir} records no MLflow run and "
                           f"{params.evaluate.out_dir} has none; run `ferflow evaluate --dataset {dataset} "
                           f"--model {model}` first")
    if on_disk is not None:
        _require_manifest(params, dataset, on_disk.tags)
    weights_sha256 = sha256_file(run_dir / layout.WEIGHTS)
    name = params.registry.name_for(dataset)
    hint = f"; nothing was written to {run_dir}: re-run `ferflow register` when MLflow is back"
    client = service.connect(params, hint)
    key = RegistrationKey.of(run_dir, weights_sha256)
    with service.mlflow_errors(f"registering {run_dir} as {name}", hint), _registering(name):
        if on_disk is not None:  # checked before a stand-in run is made for nothing
            existing = _same_version(client, name, key, on_disk.tags)
            if existing is not None:
                log.info("%s version %s already holds this run's weights with this evaluation", name, existing.version)
                return RegisteredVersion(_complete(client, existing), created=False)
        run = _source_run(client, params, dataset, run_dir, info, on_disk)
        evaluation = on_disk or evaluation_from_run(run, dataset, model)
        tags = _version_tags(params, info, dataset, run_dir, run, evaluation, weights_sha256)
        existing = _same_version(client, name, key, tags)
        if existing is not None:
            log.info("%s version %s already holds this run's weights with this evaluation; not registering again",
                     name, existing.version)
            return RegisteredVersion(_complete(client, existing), created=False)
        model_info = log_into_run(client, run_dir, info, run.info.run_id, params.serve.engine)
        logged_tags = client.get_logged_model(model_info.model_id).tags
        tags.update({k: logged_tags[k] for k in MODEL_TAGS if k in logged_tags})
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
            return RegisteredVersion(_complete(client, first), created=False)
        client.set_registered_model_alias(name, CHALLENGER, version.version)
        log.info("registered %s version %s (alias %s)", name, version.version, CHALLENGER)
        return RegisteredVersion(client.get_model_version(name, version.version), created=True)


@dataclass(frozen=True)
class RegistrationKey:
    """What makes two registrations the same, besides the evaluation data: the training
    run, the weights, the DVC trial (tags as `_version_tags` writes them)."""

    weights_sha256: str
    run_id: Optional[str]  # recorded in the run directory (mlflow_run.json)
    run_dir: str  # stands for the run when none is recorded
    experiment: str  # dvc.experiment, "" outside a trial

    @classmethod
    def of(cls, run_dir: Path, weights_sha256: str) -> "RegistrationKey":
        return cls(weights_sha256, recorded_run_id(run_dir), version_tag(Path(run_dir).resolve()),
                   version_tag(dvc_experiment()))

    def matches(self, version: ModelVersion, evaluation_tags: dict) -> bool:
        tags = version.tags
        if tags.get(WEIGHTS_TAG) != self.weights_sha256 or tags.get(EXPERIMENT_TAG, "") != self.experiment:
            return False
        if any(tags.get(k) != evaluation_tags.get(k) for k in ("eval.manifest_sha256", "eval.split")):
            return False
        if self.run_id is not None:  # that run, or the stand-in made when it was missing
            return self.run_id in (tags.get("source_run_id"), tags.get("ferflow.original_run_id"))
        return tags.get("ferflow.original_run_id") == "none" and tags.get("ferflow.run_dir") == self.run_dir


def _registering(name: str):
    """Serialise check-then-register of `name` between jobs on one embedded sqlite store,
    with a lock beside its database (held through the model's logging: a second job waits,
    then finds the first's version). Tracking servers get no lock (none spans hosts):
    `register` re-checks after creating its version instead."""
    from ferflow.locks import lock_name

    return service.store_lock("register-" + lock_name(name), f"registering {name}", REGISTER_LOCK_TIMEOUT_S)


def _same_version(client, name: str, key: RegistrationKey, evaluation_tags: dict) -> Optional[ModelVersion]:
    """The first (lowest) version registered for `key` evaluated like `evaluation_tags`."""
    for version in versions(client, name):
        if key.matches(version, evaluation_tags):
            return client.get_model_version(name, version.version)
    return None


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


def _source_run(client, params: Params, dataset: str, run_dir: Path, info: dict, evaluation: Optional[Evaluation]):
    """The training run recorded in the run dir, or a new run standing in for it."""
    run_id = recorded_run_id(run_dir)
    if run_id is not None:
        try:
            run = client.get_run(run_id)
            if run.info.lifecycle_stage == "active":
                return run
            log.warning("MLflow run %s of %s is deleted; logging into a new run", run_id, run_dir)
        except MlflowException as exc:
            if not service.not_found(exc):
                raise
            log.warning("MLflow run %s of %s is not in %s; logging into a new run",
                        run_id, run_dir, redact_uri(mlflow.get_tracking_uri()))
    tags = {"ferflow.registered_from_run_dir": "true", "ferflow.run_dir": str(run_dir.resolve()),
            "ferflow.original_run_id": run_id or "none"}
    tags = {**_lineage_tags(params, dataset, info, run_dir), **tags}
    if evaluation is not None:
        tags.update(evaluation.tags)
    experiment_id = service.current_experiment_id()
    run = client.create_run(experiment_id, run_name=f"{dataset}/{info['model']}", tags=tags)
    try:
        values = {f"train_{k}": v for k, v in train_metrics(run_dir).items()}
        values.update(evaluation.metrics if evaluation is not None else {})
        client.log_batch(run.info.run_id, metrics=run_metrics(dict(sorted(values.items())), 0))
        client.set_terminated(run.info.run_id, "FINISHED")
    except Exception:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    return client.get_run(run.info.run_id)


def _lineage_tags(params: Params, dataset: str, info: dict, run_dir: Path) -> dict[str, str]:
    """Lineage now; {} when it cannot be read (best effort beside run.json's own tags)."""
    try:
        return lineage_tags(params, dataset, str(info["model"]), run_dir, stage="register")
    except Exception as exc:  # noqa: BLE001 - lineage describes, it never blocks registration
        log.warning("lineage tags unavailable: %s", exc)
        return {}


def _ensure_registered_model(client: MlflowClient, name: str, dataset: str) -> None:
    try:
        client.create_registered_model(
            name, tags={"dataset.name": dataset},
            description=f"3-class facial-expression models (negative / neutral / positive) fine-tuned on {dataset}.",
        )
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def _version_tags(params: Params, info: dict, dataset: str, run_dir: Path, run, evaluation: Evaluation,
                  weights_sha256: str) -> dict[str, str]:
    """Lineage now, then the training run's own tags (lineage at training time), then what
    run.json and the weights say, then the evaluation: later sources win."""
    tags: dict[str, str] = dict(_lineage_tags(params, dataset, info, run_dir))
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
    tags.update({k: number_text(v) for k, v in evaluation.metrics.items()})
    experiment = dvc_experiment()
    if experiment:
        tags[EXPERIMENT_TAG] = experiment  # clipped below, with every tag
    _require_manifest(params, dataset, tags)
    tags.setdefault("eval.split", params.evaluate.split)
    return {k: version_tag(v) for k, v in tags.items() if v not in (None, "")}


def _require_manifest(params: Params, dataset: str, tags: dict) -> None:
    """The evaluation data must be named by its manifest digest: the promotion gate compares
    versions only on the same data."""
    if tags.get("eval.manifest_sha256", "unknown") == "unknown":
        report = layout.prepared_dir(params.data.prepared_dir, dataset) / layout.REPORT
        raise FerflowError(
            f"{report}: no manifest_sha256 to identify the evaluation "
            f"data, so the promotion gate could not compare this version; run `ferflow prepare --dataset {dataset}`"
        )
