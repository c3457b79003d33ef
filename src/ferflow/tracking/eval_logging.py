"""A finished evaluation logged into the MLflow run of the training it evaluated.

Metrics `eval_<metric>` (in-domain) and `eval_<dataset>_<metric>` (every evaluated dataset),
the evaluation data's manifest digests as `eval.*` tags, the evaluation files as artifacts
and the eval manifests as dataset inputs. The run is the one `<run_dir>/mlflow_run.json`
names (`rundir`); `queries` reads the same names back when registering.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ferflow import layout
from ferflow.config import Params
from ferflow.errors import FerflowError
from ferflow.redact import redact_uri
from ferflow.tracking import service
from ferflow.tracking.payload import dataset_input, number, run_metrics, run_tags
from ferflow.tracking.rundir import read_run_ref
from ferflow.tracking.service import describe_error

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

ARTIFACTS_EVAL = "evaluation"
# Every evaluation file but predictions.csv (one row per image), gallery included.
EVAL_FILES = (layout.EVAL_METRICS, layout.CONFUSION_PNG, layout.ERRORS_PNG, layout.CONFUSION_JSON,
              layout.PER_CLASS_JSON, layout.PER_CLASS_CSV)

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
            values.update(json.loads((layout.eval_cell(eval_dir, eval_ds) / layout.EVAL_METRICS).read_text()))
        except (OSError, ValueError):
            pass
        numeric = {k: number(v) for k, v in values.items() if k in EVAL_KEYS}
        numeric = {k: v for k, v in numeric.items() if v is not None}
        metrics.update({f"eval_{eval_ds}_{k}": v for k, v in numeric.items()})
        digest = read_report(params.data.prepared_dir, eval_ds).get("manifest_sha256") or "unknown"
        tags[f"eval.{eval_ds}.manifest_sha256"] = digest
        if eval_ds == dataset:
            metrics.update({f"eval_{k}": v for k, v in numeric.items()})
            tags["eval.manifest_sha256"] = digest
    return metrics, tags


def log_evaluation_run(
    params: Params, dataset: str, model: str, summary: dict, eval_dir: Path, run_dir: Optional[Path] = None
) -> Optional[str]:
    """Log a finished evaluation into the training run recorded in `mlflow_run.json`.

    Returns that run's id, or None when training recorded no run (or this store lacks it).
    An MLflow failure raises FerflowError: the files are complete, and re-running the stage
    logs them again (promotion needs these metrics, so they must not go missing silently).
    """
    from mlflow.exceptions import MlflowException

    run_dir = Path(run_dir or layout.run_dir(params.require_train().out_dir, dataset, model))
    ref = read_run_ref(run_dir)
    if ref is None:
        log.info("%s has no %s: evaluation not logged to MLflow", run_dir, layout.MLFLOW_RUN)
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
        _log_into(client, params, dataset, run_id, summary, Path(eval_dir))
    except Exception as exc:
        raise FerflowError(
            f"logging the evaluation into MLflow run {run_id} at {uri} failed: {describe_error(exc)}; "
            f"the files under {eval_dir} are complete: re-run `ferflow evaluate` to log them"
        ) from None
    return run_id


def _log_into(client: "MlflowClient", params: Params, dataset: str, run_id: str, summary: dict,
             eval_dir: Path) -> None:
    metrics, tags = evaluation_records(params, dataset, summary, eval_dir)
    client.log_batch(run_id, metrics=run_metrics(metrics, 0), tags=run_tags(tags))
    for eval_ds in summary:
        for name in EVAL_FILES:
            path = layout.eval_cell(eval_dir, eval_ds) / name
            if path.is_file():
                client.log_artifact(run_id, str(path), f"{ARTIFACTS_EVAL}/{eval_ds}")
    client.log_dict(run_id, summary, f"{ARTIFACTS_EVAL}/summary.json")
    inputs = [dataset_input(params.data.prepared_dir, ds, params.evaluate.split) for ds in summary]
    inputs = [i for i in inputs if i is not None]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
