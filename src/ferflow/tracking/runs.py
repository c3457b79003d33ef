"""Training and evaluation recorded in MLflow.

One MLflow run per (dataset, model) training, named `<dataset>/<model>`: resolved params
(flattened, dotted keys), lineage tags, the train/val manifests as dataset inputs, one metric
point per epoch (`step` = epoch), optional system metrics, and the run directory's files as
artifacts. Its id goes into `<run_dir>/mlflow_run.json`, so `evaluate` (eval metrics,
confusion matrices) and `register` attach to the same run, also from another process or
KFP task.

Nesting: a DAG invocation may own a parent run (`start_parent_run` / `parent_run`); its id
in `FERFLOW_PARENT_RUN_ID` (or `parent_run_id=`) makes every training run its child.

Failure policy: before training, any MLflow problem is a FerflowError (nothing computed yet;
`tracking.enabled=false` trains without MLflow). Once epochs run, the first MLflow failure
logs one warning and turns the rest of that run's logging off: training goes on, the files
on disk stay complete, and each failed call is bounded by the HTTP timeout and retries that
`service.configure` sets.

All client calls name the run id explicitly (no fluent active-run stack), so a pipeline's or
a notebook's own active run is never touched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import yaml

from ferflow.config import Params, dump_params
from ferflow.errors import FerflowError
from ferflow.tracking import service
from ferflow.redact import redact_text, redact_tree, redact_uri
from ferflow.tracking.service import describe_error

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from ferflow.training.trainer import TrainResult

log = logging.getLogger(__name__)

MLFLOW_RUN_FILE = "mlflow_run.json"
PARENT_RUN_ENV = "FERFLOW_PARENT_RUN_ID"
ARTIFACTS_TRAIN = "training"
ARTIFACTS_EVAL = "evaluation"
RUN_FILES = ("history.json", "history.csv", "train_metrics.json")
EVAL_FILES = ("metrics.json", "confusion.png", "errors.png", "confusion.json", "per_class.json", "per_class.csv")
# mlflow/utils/validation.py limits (MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH, MAX_ENTITY_KEY_LENGTH).
MAX_PARAM_VALUE, MAX_TAG_VALUE, MAX_KEY = 6000, 8000, 250
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


# ---------------------------------------------------------------------------- small helpers


def _now_ms() -> int:
    return int(time.time() * 1000)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _key(name: str) -> str:
    return _clip(_BAD_KEY_CHARS.sub("_", name), MAX_KEY)


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def flatten_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """`{"train": {"lr": 1}}` -> `{"train.lr": "1"}`; lists stay whole, as JSON (the
    `--set key=value` form); strings redacted; keys/values cut to MLflow's limits."""
    out: dict[str, str] = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, key + "."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out[_key(key)] = _clip(redact_text(text), MAX_PARAM_VALUE)
    return out


def _is_main_process() -> bool:
    """Only rank 0 of a torch.distributed job records anything."""
    return os.environ.get("RANK", "0") == "0"


def read_run_ref(run_dir: Path) -> Optional[dict]:
    """`<run_dir>/mlflow_run.json` (the MLflow run a training wrote), or None."""
    path = Path(run_dir) / MLFLOW_RUN_FILE
    try:
        ref = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s); ignoring it", path, exc)
        return None
    return ref if isinstance(ref, dict) and ref.get("run_id") else None


def _tags(mapping: dict) -> list:
    from mlflow.entities import RunTag

    return [RunTag(_key(str(k)), _clip(redact_text(str(v)), MAX_TAG_VALUE)) for k, v in mapping.items()]


def _metrics(mapping: dict, step: int) -> list:
    from mlflow.entities import Metric

    ts = _now_ms()
    return [Metric(_key(k), v, ts, step) for k, v in ((k, _number(v)) for k, v in mapping.items()) if v is not None]


def _dataset_input(prepared_dir: Path, dataset: str, split: str):
    """A DatasetInput for one split's manifest, or None when that data is not prepared."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from ferflow.tracking.lineage import manifest_dataset, read_report

    try:
        ds = manifest_dataset(prepared_dir, dataset, split)
    except FerflowError as exc:
        log.debug("no dataset input for %s/%s: %s", dataset, split, exc)
        return None
    full = read_report(prepared_dir, dataset).get("manifest_sha256", "")
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, split), InputTag("ferflow.manifest_sha256", full)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # schema inference hints about integer columns
        return DatasetInput(dataset=ds._to_mlflow_entity(), tags=tags)


class _Guard:
    """Runs MLflow calls during training; the first failure warns once and disables the rest."""

    def __init__(self) -> None:
        self.disabled = False
        self.where = ""

    def __call__(self, what: str, fn, *args, **kwargs):
        if self.disabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any tracking failure must not stop training
            self.disabled = True
            log.warning(
                "MLflow logging failed while %s (%s); no more MLflow logging for this run: training "
                "continues and the files in the run directory stay complete (tracking: %s)",
                what, describe_error(exc), self.where,
            )
            return None


# ---------------------------------------------------------------------------- training


class MlflowTrainCallback:
    """The TrainCallback that records one training run in MLflow (see module docstring).

    Use as a context manager around training (as `stages.train` does) so that a failing
    run is closed with status FAILED (KILLED on Ctrl-C); `start()` may be called earlier
    to fail on MLflow problems before any compute.
    """

    def __init__(
        self,
        params: Params,
        dataset: str,
        model: str,
        parent_run_id: Optional[str] = None,
        run_dir: Optional[Path] = None,
    ):
        from ferflow.training.trainer import recipe_hash, run_dir_for

        self.params, self.dataset, self.model = params, dataset, model
        self.parent_run_id = parent_run_id or os.environ.get(PARENT_RUN_ENV) or None
        self.run_dir = Path(run_dir or run_dir_for(params, dataset, model))
        self.recipe = recipe_hash(params, dataset, model)
        self.run_name = f"{dataset}/{model}"
        self.enabled = _is_main_process()
        self.run_id: Optional[str] = None
        self.resumed = False
        self._client: Optional["MlflowClient"] = None
        self._uri = ""
        self._monitor = None
        self._closed = False
        self._guard = _Guard()
        self._pending: list = []  # asynchronous per-epoch writes, awaited before the run ends

    # -- context manager: the run is closed whatever happens to training
    def __enter__(self) -> "MlflowTrainCallback":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED", error=exc)
        return False

    # -- start: every problem here is a FerflowError (no compute has happened yet)
    def start(self) -> Optional[str]:
        if not self.enabled or self.run_id is not None:
            return self.run_id
        client = service.configure(self.params)
        self._client, self._uri = client, service.current_tracking_uri() or ""
        self._guard.where = redact_uri(self._uri)
        try:
            self.run_id, self.resumed = self._open_run(client, service.current_experiment_id())
            self._log_start(client)
        except Exception as exc:
            if self.run_id is not None:
                try:
                    client.set_terminated(self.run_id, "FAILED")
                except Exception:  # noqa: BLE001 - the original error is the one to report
                    pass
                self._closed = True
            if isinstance(exc, FerflowError):
                raise
            raise FerflowError(
                f"MLflow at {redact_uri(self._uri)} refused the training run {self.run_name}: "
                f"{describe_error(exc)}; fix the server/credentials or set tracking.enabled=false"
            ) from None
        self._start_system_metrics()
        log.info("MLflow run %s (%s) at %s%s", self.run_id, self.run_name, redact_uri(self._uri),
                 " (resumed)" if self.resumed else "")
        return self.run_id

    def _open_run(self, client: "MlflowClient", experiment_id: str) -> tuple[str, bool]:
        """Continue the run of an interrupted training (same recipe, last.pt present), else
        create a new one, child of the DAG's parent run when there is one."""
        from mlflow.exceptions import MlflowException
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        prior = read_run_ref(self.run_dir)
        if prior and prior.get("recipe_hash") == self.recipe and (self.run_dir / "last.pt").is_file():
            try:
                run = client.get_run(prior["run_id"])
            except MlflowException:
                run = None
            if run is not None and run.info.lifecycle_stage == "active" and run.info.experiment_id == experiment_id:
                client.update_run(run.info.run_id, status="RUNNING")
                return run.info.run_id, True
        tags = {MLFLOW_RUN_NAME: self.run_name}
        if self.parent_run_id:
            try:
                client.get_run(self.parent_run_id)
                tags[MLFLOW_PARENT_RUN_ID] = self.parent_run_id
            except MlflowException:
                log.warning("parent run %s (%s) not found in %s; the training run is not nested",
                            self.parent_run_id, PARENT_RUN_ENV, redact_uri(self._uri))
        try:  # MLflow's context tags: user, source name/type, git commit
            from mlflow.tracking.context.registry import resolve_tags

            tags = resolve_tags(tags)
        except Exception as exc:  # noqa: BLE001 - only descriptive
            log.debug("MLflow context tags unavailable: %s", exc)
        run = client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        return run.info.run_id, False

    def _log_start(self, client: "MlflowClient") -> None:
        from mlflow.entities import Param

        from ferflow.tracking.lineage import has_split, lineage_tags

        params = flatten_params(dump_params(self.params))
        if self.resumed:  # params are immutable in MLflow: log only what the run lacks
            have = client.get_run(self.run_id).data.params
            changed = sorted(k for k, v in params.items() if k in have and have[k] != v)
            if changed:
                log.info("resumed run keeps its first values of %s", ", ".join(changed[:10]))
            params = {k: v for k, v in params.items() if k not in have}
        tags = {**lineage_tags(self.params, self.dataset, self.model, stage="train"),
                "ferflow.dataset": self.dataset, "ferflow.model": self.model,
                "ferflow.run_dir": str(self.run_dir), "recipe.hash": self.recipe}
        client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()], tags=_tags(tags))
        prepared = self.params.data.prepared_dir
        val = "val" if has_split(prepared, self.dataset, "val") else "eval"  # the trainer's fallback
        inputs = [i for i in (_dataset_input(prepared, self.dataset, s) for s in ("train", val)) if i is not None]
        if inputs:
            client.log_inputs(self.run_id, datasets=inputs)

    def _start_system_metrics(self) -> None:
        if not self.params.tracking.log_system_metrics:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=self.resumed, tracking_uri=self._uri)
            self._monitor.start()
        except Exception as exc:  # noqa: BLE001 - e.g. psutil missing: training goes on
            log.warning("system metrics not recorded: %s", describe_error(exc))
            self._monitor = None

    # -- TrainCallback
    def on_train_start(self, info: dict) -> None:
        if not self.enabled:
            return
        if self.run_id is None:  # used without stages.train's early start
            self.start()
        tags = {"model.base_sha256": info.get("weights_sha256") or "none",
                "model.weights_source": info.get("weights_source", "none"),
                "model.arch": info.get("arch"), "model.input_size": info.get("input_size"),
                "train.device": info.get("device"), "train.amp": info.get("amp"),
                "train.world_size": info.get("world_size"), "train.n_train": info.get("n_train"),
                "train.n_val": info.get("n_val"), "train.val_split": info.get("val_split")}
        self._guard("tagging the run", self._client.log_batch, self.run_id,
                    tags=_tags({k: v for k, v in tags.items() if v is not None}))
        self._write_ref()

    def on_epoch_end(self, record: dict) -> None:
        if not self.enabled or self.run_id is None:
            return
        step = int(record.get("epoch", 0))
        values = {k: v for k, v in record.items() if k != "epoch"}
        # Asynchronous: the training thread only queues the write (~0.2 ms instead of tens of
        # ms per epoch, benchmarks/RESULTS.md P5); failures surface when awaited in _flush.
        op = self._guard(f"logging epoch {step}", self._client.log_batch, self.run_id,
                         metrics=_metrics(values, step), synchronous=False)
        if op is not None:
            self._pending.append((step, op))

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for step, op in pending:
            self._guard(f"logging epoch {step}", op.wait)

    def on_train_end(self, result: "TrainResult") -> None:
        if not self.enabled or self.run_id is None:
            return
        self._flush()
        self._guard("logging the training artifacts", self._log_result, result)
        self.close("FINISHED")

    def _log_result(self, result: "TrainResult") -> None:
        from ferflow.labels import CLASSES

        client, run_id = self._client, self.run_id
        if self.resumed:  # epochs finished before a crash but never logged (killed in between)
            logged = {m.step for m in client.get_metric_history(run_id, "train_loss")}
            missing = [h for h in result.history if int(h.get("epoch", 0)) not in logged]
            metrics = [m for h in missing
                       for m in _metrics({k: v for k, v in h.items() if k != "epoch"}, int(h["epoch"]))]
            if metrics:
                client.log_batch(run_id, metrics=metrics)
        summary = {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                   **{f"best_{k}": v for k, v in result.best_metrics.items()}}
        client.log_batch(run_id, metrics=_metrics(summary, result.epochs_run))
        for name in RUN_FILES:
            if (result.run_dir / name).is_file():
                client.log_artifact(run_id, str(result.run_dir / name), ARTIFACTS_TRAIN)
        run_json = result.run_dir / "run.json"
        if run_json.is_file():  # redacted copy: it holds the params (URIs) and weights source
            client.log_dict(run_id, redact_tree(json.loads(run_json.read_text())), f"{ARTIFACTS_TRAIN}/run.json")
        client.log_text(run_id, yaml.safe_dump(redact_tree(dump_params(self.params)), sort_keys=False),
                        f"{ARTIFACTS_TRAIN}/params.yaml")
        client.log_dict(run_id, {"classes": list(CLASSES), "label_ids": {c: i for i, c in enumerate(CLASSES)}},
                        f"{ARTIFACTS_TRAIN}/label_map.json")

    def _write_ref(self) -> None:
        from ferflow.training.checkpoint import atomic_write_json

        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.run_dir / MLFLOW_RUN_FILE, {
            "run_id": self.run_id, "run_name": self.run_name,
            "experiment_id": service.current_experiment_id(), "experiment": self.params.tracking.experiment,
            "tracking_uri": redact_uri(self._uri), "recipe_hash": self.recipe,
            "parent_run_id": self.parent_run_id,
        })

    # -- end
    def close(self, status: str = "FINISHED", error: Optional[BaseException] = None) -> None:
        """End the run once (idempotent); never raises."""
        if self._closed or self.run_id is None:
            self._closed = True
            return
        self._closed = True
        self._flush()
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as exc:  # noqa: BLE001
                log.debug("stopping system metrics: %s", exc)
            self._monitor = None
        if error is not None:
            self._guard("recording the error", self._client.log_batch, self.run_id,
                        tags=_tags({"ferflow.error": f"{type(error).__name__}: {error}"}))
        self._guard(f"ending the run ({status})", self._client.set_terminated, self.run_id, status)


# ---------------------------------------------------------------------------- evaluation


# Per eval dataset; baseline_* is the zero-shot result of the run's starting checkpoint.
EVAL_KEYS = ("accuracy", "macro_f1", "balanced_accuracy", "n", "baseline_accuracy", "baseline_macro_f1")


def evaluation_records(params: Params, dataset: str, summary: dict, eval_dir: Path) -> tuple[dict, dict]:
    """(metrics, tags) of a cross-dataset evaluation: `eval_<metric>` for the in-domain
    dataset, `eval_<dataset>_<metric>` for every evaluated one; eval data digests as tags."""
    from ferflow.tracking.lineage import read_report

    metrics: dict[str, float] = {}
    tags: dict[str, str] = {"eval.split": params.evaluate.split, "eval.datasets": ",".join(summary)}
    for eval_ds, values in summary.items():
        values = dict(values)
        try:  # metrics.json has balanced_accuracy too
            values.update(json.loads((Path(eval_dir) / eval_ds / "metrics.json").read_text()))
        except (OSError, ValueError):
            pass
        numeric = {k: _number(v) for k, v in values.items() if k in EVAL_KEYS}
        numeric = {k: v for k, v in numeric.items() if v is not None}
        metrics.update({f"eval_{eval_ds}_{k}": v for k, v in numeric.items()})
        digest = read_report(params.data.prepared_dir, eval_ds).get("manifest_sha256") or "unknown"
        tags[f"eval.{eval_ds}.manifest_sha256"] = digest
        if eval_ds == dataset:
            metrics.update({f"eval_{k}": v for k, v in numeric.items()})
            tags["eval.manifest_sha256"] = digest
    return metrics, tags


def log_evaluation(
    params: Params, dataset: str, model: str, summary: dict, eval_dir: Path, run_dir: Optional[Path] = None
) -> Optional[str]:
    """Log a finished evaluation into the training run recorded in `mlflow_run.json`.

    Returns that run's id, or None when training recorded no run (or this store lacks it).
    An MLflow failure raises FerflowError: the files are complete, and re-running the stage
    logs them again (promotion needs these metrics, so they must not go missing silently).
    """
    from mlflow.exceptions import MlflowException

    from ferflow.training.trainer import run_dir_for

    run_dir = Path(run_dir or run_dir_for(params, dataset, model))
    ref = read_run_ref(run_dir)
    if ref is None:
        log.info("%s has no %s: evaluation not logged to MLflow", run_dir, MLFLOW_RUN_FILE)
        return None
    client = service.configure(params)
    uri, run_id = redact_uri(service.current_tracking_uri() or ""), ref["run_id"]
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            log.warning("training run %s (%s) is not in %s; evaluation not logged to MLflow",
                        run_id, ref.get("tracking_uri"), uri)
            return None
        raise FerflowError(f"MLflow at {uri}: cannot read run {run_id}: {describe_error(exc)}") from None
    if run.info.lifecycle_stage != "active":
        log.warning("training run %s is deleted in %s; evaluation not logged to MLflow", run_id, uri)
        return None
    try:
        _log_evaluation(client, params, dataset, run_id, summary, Path(eval_dir))
    except Exception as exc:
        raise FerflowError(
            f"logging the evaluation into MLflow run {run_id} at {uri} failed: {describe_error(exc)}; "
            f"the files under {eval_dir} are complete: re-run `ferflow evaluate` to log them"
        ) from None
    return run_id


def _log_evaluation(client: "MlflowClient", params: Params, dataset: str, run_id: str, summary: dict,
                    eval_dir: Path) -> None:
    metrics, tags = evaluation_records(params, dataset, summary, eval_dir)
    client.log_batch(run_id, metrics=_metrics(metrics, 0), tags=_tags(tags))
    for eval_ds in summary:
        for name in EVAL_FILES:
            path = eval_dir / eval_ds / name
            if path.is_file():
                client.log_artifact(run_id, str(path), f"{ARTIFACTS_EVAL}/{eval_ds}")
    client.log_dict(run_id, summary, f"{ARTIFACTS_EVAL}/summary.json")
    inputs = [_dataset_input(params.data.prepared_dir, ds, params.evaluate.split) for ds in summary]
    inputs = [i for i in inputs if i is not None]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


# ---------------------------------------------------------------------------- parent runs


def start_parent_run(params: Params, name: str) -> str:
    """Create the parent run of one DAG invocation and return its id.

    Export it as FERFLOW_PARENT_RUN_ID to the stages (or use `parent_run`), and end it with
    `end_parent_run`; training runs nest under it.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    from ferflow import __version__
    from ferflow.tracking.lineage import git_tags, kfp_run_id

    client = service.configure(params)
    tags = {**git_tags(), MLFLOW_RUN_NAME: name, "ferflow.version": __version__, "ferflow.stage": "pipeline",
            "kfp.run_id": kfp_run_id()}
    try:
        tag_values = {t.key: t.value for t in _tags(tags)}
        run = client.create_run(service.current_experiment_id(), run_name=name, tags=tag_values)
    except Exception as exc:
        raise FerflowError(f"MLflow at {redact_uri(service.current_tracking_uri() or '')} refused the "
                           f"parent run {name!r}: {describe_error(exc)}") from None
    return run.info.run_id


def end_parent_run(params: Params, run_id: str, status: str = "FINISHED") -> None:
    client = service.configure(params)
    try:
        client.set_terminated(run_id, status)
    except Exception as exc:
        raise FerflowError(f"cannot end MLflow parent run {run_id}: {describe_error(exc)}") from None


@contextmanager
def parent_run(params: Params, name: str) -> Iterator[str]:
    """A parent run for the block, exported as FERFLOW_PARENT_RUN_ID to it (and to the
    subprocesses it starts); ended FINISHED, or FAILED when the block raises."""
    run_id = start_parent_run(params, name)
    before = os.environ.get(PARENT_RUN_ENV)
    os.environ[PARENT_RUN_ENV] = run_id
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    finally:
        if before is None:
            os.environ.pop(PARENT_RUN_ENV, None)
        else:
            os.environ[PARENT_RUN_ENV] = before
        try:
            end_parent_run(params, run_id, status)
        except FerflowError as exc:
            log.warning("%s", exc)
