"""The MLflow parent run of one DAG invocation (`ferflow parent-run -- dvc repro`).

Its id in `FERFLOW_PARENT_RUN_ID` (or `parent_run_id=` of `runs.MlflowTrainCallback`) makes
every training run started under it its child.

A parent under which no run started (an up-to-date `dvc repro`) is deleted when the block
succeeds, so it never shows. Created first and removed at the end rather than created by
its first child: the id is exported before any child starts (children in parallel
processes need no coordination), and the count is taken once the command has exited, when
no child of it can still attach. A failed block keeps its parent (FAILED) as the record of
that invocation; a wrapper killed outright leaves it RUNNING, as any MLflow run would be.
Deletion is MLflow's: the run moves to the deleted view (`mlflow gc` purges it).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

from ferflow.config import Params
from ferflow.errors import FerflowError
from ferflow.redact import redact_uri
from ferflow.tracking import service
from ferflow.tracking.payload import run_tags
from ferflow.tracking.service import describe_error

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "FERFLOW_PARENT_RUN_ID"


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
        tag_values = {t.key: t.value for t in run_tags(tags)}
        run = client.create_run(service.current_experiment_id(), run_name=name, tags=tag_values)
    except Exception as exc:
        raise FerflowError(f"MLflow at {redact_uri(service.current_tracking_uri() or '')} refused the "
                           f"parent run {name!r}: {describe_error(exc)}") from None
    return run.info.run_id


def end_parent_run(params: Params, run_id: str, status: str = "FINISHED", drop_if_childless: bool = False) -> bool:
    """End the parent run; with `drop_if_childless`, delete it when no run names it as its
    parent. Returns whether it was deleted."""
    client = service.configure(params)
    try:
        client.set_terminated(run_id, status)
        if drop_if_childless and not has_children(client, run_id):
            client.delete_run(run_id)
            return True
    except Exception as exc:
        raise FerflowError(f"cannot end MLflow parent run {run_id}: {describe_error(exc)}") from None
    return False


def has_children(client, run_id: str) -> bool:
    """Whether any run (deleted ones too) of the parent's experiment is nested under it."""
    from mlflow.entities import ViewType
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    experiment_id = client.get_run(run_id).info.experiment_id
    return bool(client.search_runs([experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run_id}'",
                                   run_view_type=ViewType.ALL, max_results=1))


@contextmanager
def parent_run(params: Params, name: str) -> Iterator[str]:
    """A parent run for the block, exported as FERFLOW_PARENT_RUN_ID to it (and to the
    subprocesses it starts); ended FINISHED (deleted when no run was started under it), or
    FAILED when the block raises."""
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
            if end_parent_run(params, run_id, status, drop_if_childless=status == "FINISHED"):
                log.info("MLflow parent run %s (%s): no run started under it; deleted", run_id, name)
        except FerflowError as exc:
            log.warning("%s", exc)
