"""Training recorded in MLflow: the callback that logs one training run.

One MLflow run per (dataset, model) training, named `<dataset>/<model>`: resolved params
(flattened, dotted keys), lineage tags, the train/val manifests as dataset inputs, one metric
point per epoch (`step` = epoch), optional system metrics, and the run directory's files as
artifacts. Its id goes into `<run_dir>/mlflow_run.json` (`rundir`), so `evaluate`
(`eval_logging`) and `register` (`versioning`) attach to the same run, also from another
process or KFP task. A DAG invocation's parent run (`parent_runs`) makes it a child.

Failure policy: before training, any MLflow problem is a FerflowError (nothing computed yet;
`tracking.enabled=false` trains without MLflow). Once epochs run, the first MLflow failure
logs one warning and turns the rest of that run's logging off: training goes on, the files
on disk stay complete, and each failed call is bounded by the HTTP timeout and retries that
`service.configure` sets.

All client calls name the run id explicitly (no fluent active-run stack), so a pipeline's or
a notebook's own active run is never touched.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import yaml

from ferflow import layout
from ferflow.config import Params, dump_params
from ferflow.errors import FerflowError
from ferflow.redact import redact_tree, redact_uri
from ferflow.tracking import service
from ferflow.tracking.parent_runs import PARENT_RUN_ENV
from ferflow.tracking.payload import dataset_input, flatten_params, run_metrics, run_tags
from ferflow.tracking.rundir import read_run_ref, write_run_ref
from ferflow.tracking.service import describe_error

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from ferflow.training.trainer import TrainResult

log = logging.getLogger(__name__)

ARTIFACTS_TRAIN = "training"


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
        from ferflow.training.runtime import is_main_process
        from ferflow.training.trainer import recipe_hash

        self.params, self.dataset, self.model = params, dataset, model
        self.parent_run_id = parent_run_id or os.environ.get(PARENT_RUN_ENV) or None
        self.run_dir = Path(run_dir or layout.run_dir(params.require_train().out_dir, dataset, model))
        self.recipe = recipe_hash(params, dataset, model)
        self.run_name = f"{dataset}/{model}"
        self.enabled = is_main_process()  # only rank 0 of a torch.distributed job records anything
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
        if prior and prior.get("recipe_hash") == self.recipe and (self.run_dir / layout.LAST).is_file():
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

        from ferflow.models.zoo import input_size
        from ferflow.tracking.lineage import lineage_tags
        from ferflow.training.trainer import validation_split_name

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
        client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()], tags=run_tags(tags))
        prepared = self.params.data.prepared_dir
        # The split the trainer will select epochs on (val, or eval when there is none).
        val = validation_split_name(layout.prepared_dir(prepared, self.dataset),
                                    input_size(self.model, self.params.require_train().input_size))
        inputs = [i for i in (dataset_input(prepared, self.dataset, s) for s in ("train", val)) if i is not None]
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
                "model.weights_source": info.get("weights_source", "none"), "model.init": info.get("init"),
                "model.arch": info.get("arch"), "model.input_size": info.get("input_size"),
                "train.device": info.get("device"), "train.amp": info.get("amp"),
                "train.world_size": info.get("world_size"), "train.n_train": info.get("n_train"),
                "train.n_val": info.get("n_val"), "train.val_split": info.get("val_split")}
        self._guard("tagging the run", self._client.log_batch, self.run_id,
                    tags=run_tags({k: v for k, v in tags.items() if v is not None}))
        self._write_ref()

    def on_epoch_end(self, record: dict) -> None:
        if not self.enabled or self.run_id is None:
            return
        step = int(record.get("epoch", 0))
        values = {k: v for k, v in record.items() if k != "epoch"}
        # Asynchronous: the training thread only queues the write (~0.2 ms instead of tens of
        # ms per epoch, benchmarks/RESULTS.md P5); failures surface when awaited in _flush.
        op = self._guard(f"logging epoch {step}", self._client.log_batch, self.run_id,
                         metrics=run_metrics(values, step), synchronous=False)
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
                       for m in run_metrics({k: v for k, v in h.items() if k != "epoch"}, int(h["epoch"]))]
            if metrics:
                client.log_batch(run_id, metrics=metrics)
        summary = {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                   **{f"best_{k}": v for k, v in result.best_metrics.items()}}
        client.log_batch(run_id, metrics=run_metrics(summary, result.epochs_run))
        for name in layout.RUN_FILES:
            if (result.run_dir / name).is_file():
                client.log_artifact(run_id, str(result.run_dir / name), ARTIFACTS_TRAIN)
        if (result.run_dir / layout.RUN_JSON).is_file():  # redacted copy: it holds the params (URIs) and weights source
            info = layout.read_run_info(result.run_dir, required=())
            client.log_dict(run_id, redact_tree(info), f"{ARTIFACTS_TRAIN}/{layout.RUN_JSON}")
        client.log_text(run_id, yaml.safe_dump(redact_tree(dump_params(self.params)), sort_keys=False),
                        f"{ARTIFACTS_TRAIN}/params.yaml")
        client.log_dict(run_id, {"classes": list(CLASSES), "label_ids": {c: i for i, c in enumerate(CLASSES)}},
                        f"{ARTIFACTS_TRAIN}/label_map.json")

    def _write_ref(self) -> None:
        write_run_ref(self.run_dir, {
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
                        tags=run_tags({"ferflow.error": f"{type(error).__name__}: {error}"}))
        self._guard(f"ending the run ({status})", self._client.set_terminated, self.run_id, status)
