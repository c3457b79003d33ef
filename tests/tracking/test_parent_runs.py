"""`ferflow parent-run` leaves a parent run only when a run started under it (issue 13,
item 2): an up-to-date `dvc repro` adds nothing to MLflow."""

import os
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import ViewType

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import os, sys
from mlflow import MlflowClient
client = MlflowClient(sys.argv[1])
exp = client.get_experiment_by_name("ferflow").experiment_id
run = client.create_run(exp, run_name="child", tags={"mlflow.parentRunId": os.environ["FERFLOW_PARENT_RUN_ID"]})
client.set_terminated(run.info.run_id)
"""


def parent_run(tmp_path, *command):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(
        [sys.executable, "-m", "ferflow.cli", "parent-run", "--name", "x",
         "--set", f"tracking.tracking_uri={db}", "--set", f"tracking.artifact_location={tmp_path / 'art'}",
         "--", *[db if c == "{db}" else c for c in command]],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FERFLOW_PARENT"))},
    )
    client = MlflowClient(db)
    ids = [e.experiment_id for e in client.search_experiments()]
    return done, client, client.search_runs(ids)


def test_a_command_that_starts_no_run_leaves_no_parent(tmp_path):
    done, client, runs = parent_run(tmp_path, "true")
    assert done.returncode == 0, done.stderr
    assert runs == []
    # deleted, not left RUNNING or FINISHED-and-empty: restorable, and `mlflow gc` purges it
    deleted = client.search_runs([e.experiment_id for e in client.search_experiments()], run_view_type=ViewType.ALL)
    assert [(r.info.run_name, r.info.lifecycle_stage, r.info.status) for r in deleted] == [("x", "deleted", "FINISHED")]


def test_a_command_that_starts_a_run_keeps_its_parent(tmp_path):
    done, client, runs = parent_run(tmp_path, sys.executable, "-c", CHILD, "{db}")
    assert done.returncode == 0, done.stderr
    parent = next(r for r in runs if r.info.run_name == "x")
    child = next(r for r in runs if r.info.run_name == "child")
    assert len(runs) == 2 and parent.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id


def test_a_failed_command_keeps_its_parent_failed(tmp_path):
    done, _client, runs = parent_run(tmp_path, "false")
    assert done.returncode != 0
    assert [(r.info.run_name, r.info.status) for r in runs] == [("x", "FAILED")]
