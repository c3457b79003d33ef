"""Jobs started together on one store: a fresh embedded sqlite store is initialised once
(not migrated by two processes at the same time), and the same run registered twice at
once ends as one model version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ferflow.tracking import service, versioning
from tracking.test_registry import DATASET, tracking, trained, variant  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[2]

# Heavy imports first, then wait for the go file: both processes reach MLflow together.
OPEN_STORE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import mlflow, mlflow.store.tracking.sqlalchemy_store, alembic  # noqa: F401
    from ferflow.config import TrackingSettings
    from ferflow.tracking import service

    uri, artifacts, ready, go = sys.argv[1:5]
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.002)
    client = service.configure(TrackingSettings(tracking_uri=uri, artifact_location=artifacts, experiment="race"))
    run = client.create_run(service.current_experiment_id())
    client.set_terminated(run.info.run_id)
    print("RUN", run.info.run_id)
""")


def _start_together(n: int, tmp: Path, argv) -> list[subprocess.CompletedProcess]:
    """Run `n` copies of a Python snippet, released at once when all have imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    go = tmp / "go"
    procs = []
    for i in range(n):
        procs.append(subprocess.Popen(
            [sys.executable, "-c", OPEN_STORE, *argv, str(tmp / f"ready{i}"), str(go)], cwd=tmp, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 180
    while not all((tmp / f"ready{i}").exists() for i in range(n)):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            break
        time.sleep(0.02)
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def test_jobs_started_together_on_a_fresh_sqlite_store_both_succeed(tmp_path):
    db = tmp_path / "mlruns" / "mlflow.db"
    results = _start_together(2, tmp_path, [f"sqlite:///{db}", str(tmp_path / "mlruns" / "artifacts")])
    for r in results:
        assert r.returncode == 0 and "RUN " in r.stdout, r.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("race")
    assert len(client.search_runs([exp.experiment_id])) == 2


# ---------------------------------------------------------------------------- register


def _at_once(*calls) -> list:
    """Run the calls in threads released together; their results, in order."""
    barrier, results, errors = threading.Barrier(len(calls)), [None] * len(calls), []

    def go(i, call):
        try:
            barrier.wait()
            results[i] = call()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    return results


def _sqlite_uri(tmp_path: Path, monkeypatch) -> str:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def _live_versions(client, name) -> list:
    return sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_the_same_run_registered_twice_at_once_is_one_version(trained, store, tmp_path, monkeypatch, request):
    """sqlite: the register lock beside the database serialises the two; a tracking server
    (no lock spans hosts): the later of two duplicate versions removes itself."""
    uri = _sqlite_uri(tmp_path, monkeypatch) if store == "sqlite" else request.getfixturevalue("tracking").uri
    params, run = variant(trained, uri, tmp_path / "v", 0.8, 5, f"tracking.artifact_location={tmp_path / 'art'}")
    service.configure(params)  # a run recorded by training, as `ferflow train` leaves it
    client = MlflowClient()
    recorded = client.create_run(service.current_experiment_id()).info.run_id
    (run / "mlflow_run.json").write_text(json.dumps({"run_id": recorded}))
    name = params.registry.name_for(DATASET)

    first, second = _at_once(lambda: versioning.register(params, DATASET, run),
                             lambda: versioning.register(params, DATASET, run))
    assert str(first.version) == str(second.version)
    client = MlflowClient(uri, registry_uri=uri)
    live = _live_versions(client, name)
    assert [str(v.version) for v in live] == [str(first.version)] and live[0].run_id == recorded
    assert {k: str(v) for k, v in client.get_registered_model(name).aliases.items()} == {
        "challenger": str(first.version)}
    # One logged model in the run: the loser's duplicate (if any) is deleted with its version.
    models = client.search_logged_models(experiment_ids=[service.current_experiment_id()])
    assert [f"models:/{m.model_id}" for m in models if m.source_run_id == recorded] == [live[0].source]


def test_another_run_with_the_same_weights_gets_its_own_version(trained, tmp_path, monkeypatch):
    """A `dvc exp run` trial whose best weights equal the baseline's: its own version,
    tagged with the trial, from its own training run; a retry of either adds nothing."""
    uri = _sqlite_uri(tmp_path, monkeypatch)
    params, base = variant(trained, uri, tmp_path / "base", 0.8, 7, f"tracking.artifact_location={tmp_path / 'art'}")
    service.configure(params)
    client = MlflowClient()
    trial = tmp_path / "trial" / "run"
    shutil.copytree(base, trial)
    runs = {}
    for run_dir in (base, trial):
        runs[run_dir] = client.create_run(service.current_experiment_id()).info.run_id
        (run_dir / "mlflow_run.json").write_text(json.dumps({"run_id": runs[run_dir]}))
    name = params.registry.name_for(DATASET)

    baseline = versioning.register(params, DATASET, base)
    monkeypatch.setenv("DVC_EXP_NAME", "tidy-tern")
    tried = versioning.register(params, DATASET, trial)
    assert str(tried.version) != str(baseline.version)
    assert tried.tags["dvc.experiment"] == "tidy-tern" and tried.run_id == runs[trial]
    assert tried.tags["model.weights_sha256"] == baseline.tags["model.weights_sha256"]
    assert versioning.register(params, DATASET, trial).version == tried.version
    monkeypatch.delenv("DVC_EXP_NAME")
    again = versioning.register(params, DATASET, base)
    assert again.version == baseline.version and "dvc.experiment" not in again.tags
    # Without a recorded MLflow run a run directory stands for the run.
    (trial / "mlflow_run.json").unlink()
    monkeypatch.setenv("DVC_EXP_NAME", "tidy-tern")
    standin = versioning.register(params, DATASET, trial)
    assert standin.tags["ferflow.registered_from_run_dir"] == "true"
    assert versioning.register(params, DATASET, trial).version == standin.version
    assert len(_live_versions(client, name)) == 3
