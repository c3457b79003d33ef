"""Training and evaluation recorded in MLflow: against a real `mlflow server` process (sqlite
backend, artifacts proxied to a moto S3 process), the embedded sqlite default, a server that
is down, one that dies mid-training, and a scan of everything logged for credentials."""

import json
import logging
import os
import signal
import time
import uuid
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from ferflow import stages
from ferflow.config import load_params
from ferflow.errors import FerflowError
from ferflow.tracking import parent_runs
from ferflow.training.trainer import recipe_hash

from conftest import start_mlflow_server, stop_process  # tests/conftest.py (rootdir on sys.path)

from .conftest import TRAIN_OVERRIDES

DS, MODEL = "LFW-FER", "demo_tiny"


def tracked(params_file, tmp_path, *extra):
    """Demo params with tracking on, outputs under tmp_path, a unique experiment."""
    return load_params(params_file, TRAIN_OVERRIDES + [
        "tracking.enabled=true", f"tracking.experiment=test-{uuid.uuid4().hex[:8]}",
        f"train.out_dir={tmp_path / 'models'}", f"evaluate.out_dir={tmp_path / 'evaluation'}",
        "train.max_steps_per_epoch=20", *extra,
    ])


def read_json(path):
    return json.loads(Path(path).read_text())


def run_of(params, server_uri=None):
    ref = read_json(params.train.out_dir / DS / MODEL / "mlflow_run.json")
    client = MlflowClient(server_uri) if server_uri else MlflowClient()
    return client, client.get_run(ref["run_id"])


def bucket_keys(s3, bucket="ferflow-mlflow"):
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_train_and_evaluate_recorded_on_the_server(demo_workspace, tmp_path, mlflow_server, s3_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    params = tracked(demo_workspace, tmp_path)
    result = stages.train(params, DS, MODEL)
    summary = stages.evaluate(params, DS, MODEL, [DS, "M-LFW-FER"])

    client, run = run_of(params, mlflow_server.uri)
    assert run.info.status == "FINISHED" and run.info.run_name == f"{DS}/{MODEL}"
    assert client.get_experiment(run.info.experiment_id).name == params.tracking.experiment
    # params: flattened dotted keys, lists as JSON
    p = run.data.params
    assert p["train.full_stage.epochs"] == "3" and p["train.models"] == '["demo_tiny"]'
    assert p[f"data.archives.{DS}.sha256"] == params.data.archives[DS].sha256
    assert p["tracking.enabled"] == "true" and p["seed"] == "42"
    # one point per epoch, step = epoch, values as in history.json
    history = read_json(result.run_dir / "history.json")
    points = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert sorted(m.step for m in points) == [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert {m.step: m.value for m in points} == {h["epoch"]: h["val_accuracy"] for h in history}
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    # evaluation into the same run
    m = run.data.metrics
    assert m["eval_accuracy"] == pytest.approx(summary[DS]["accuracy"])
    assert m[f"eval_{DS}_macro_f1"] == pytest.approx(summary[DS]["macro_f1"])
    assert m["eval_M-LFW-FER_accuracy"] == pytest.approx(summary["M-LFW-FER"]["accuracy"])
    # lineage
    report = read_json(params.data.prepared_dir / DS / "report.json")
    t = run.data.tags
    assert t["dataset.manifest_sha256"] == report["manifest_sha256"] == t["eval.manifest_sha256"]
    assert t["eval.M-LFW-FER.manifest_sha256"] == read_json(params.data.prepared_dir / "M-LFW-FER/report.json")["manifest_sha256"]
    assert t["recipe.hash"] == recipe_hash(params, DS, MODEL) == read_json(result.run_dir / "run.json")["recipe_hash"]
    assert t["dataset.archive_sha256"] == params.data.archives[DS].sha256
    assert t["model.base_checkpoint"] == "none" and t["ferflow.stage"] == "train" and t["eval.split"] == "eval"
    assert len(t["git.commit"]) == 40 or t["git.commit"] == "unknown"
    # dataset inputs: digest = manifest hash (MLflow stores 36 characters)
    inputs = {(d.dataset.name, next(x.value for x in d.tags if x.key == "mlflow.data.context")): d
              for d in run.inputs.dataset_inputs}
    assert {("LFW-FER/train", "train"), ("LFW-FER/val", "val"), ("LFW-FER/eval", "eval"),
            ("M-LFW-FER/eval", "eval")} <= set(inputs)
    assert inputs[("LFW-FER/train", "train")].dataset.digest == report["manifest_sha256"][:36]
    # artifacts went through the server into S3
    keys = [k for k in bucket_keys(s3_server) if run.info.run_id in k]
    for name in ("training/history.json", "training/history.csv", "training/run.json", "training/params.yaml",
                 "training/label_map.json", f"evaluation/{DS}/confusion.png", f"evaluation/{DS}/per_class.json"):
        assert any(k.endswith(name) for k in keys), (name, keys)


def test_embedded_default_store_under_cwd_nested_in_a_parent_run(demo_workspace, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(parent_runs.PARENT_RUN_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    params = tracked(demo_workspace, tmp_path, "tracking.log_system_metrics=false", "train.full_stage.epochs=1")
    assert params.tracking.tracking_uri == "sqlite:///mlruns/mlflow.db"
    with parent_runs.parent_run(params, "dag-invocation") as parent_id:
        assert os.environ[parent_runs.PARENT_RUN_ENV] == parent_id
        stages.train(params, DS, MODEL)
        stages.evaluate(params, DS, MODEL, [DS])
    assert parent_runs.PARENT_RUN_ENV not in os.environ
    assert (tmp_path / "mlruns/mlflow.db").is_file()
    client, run = run_of(params, f"sqlite:///{tmp_path / 'mlruns/mlflow.db'}")
    artifacts = tmp_path / "mlruns/artifacts" / run.info.run_id / "artifacts"
    assert (artifacts / "training/history.json").is_file() and (artifacts / f"evaluation/{DS}/confusion.png").is_file()
    assert run.data.metrics["eval_accuracy"] > 0 and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert not any(k.startswith("system/") for k in run.data.metrics)


def test_interrupted_training_fails_its_run_and_the_resume_continues_it(demo_workspace, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    params = tracked(demo_workspace, tmp_path, "tracking.log_system_metrics=false")

    class CrashAtEpoch2:  # runs before the tracker's on_epoch_end: epoch 2 is saved, never logged
        def on_train_start(self, info): ...
        def on_epoch_end(self, record):
            if record["epoch"] == 2:
                raise RuntimeError("node preempted")
        def on_train_end(self, result): ...

    with pytest.raises(RuntimeError):
        stages.train(params, DS, MODEL, callbacks=[CrashAtEpoch2()])
    client, run = run_of(params, f"sqlite:///{tmp_path / 'mlruns/mlflow.db'}")
    assert run.info.status == "FAILED" and "node preempted" in run.data.tags["ferflow.error"]
    result = stages.train(params, DS, MODEL)
    assert result.resumed_from_epoch == 2
    _client, again = run_of(params, f"sqlite:///{tmp_path / 'mlruns/mlflow.db'}")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert sorted(steps) == [1, 2, 3, 4]


def test_server_down_fails_before_any_epoch(demo_workspace, tmp_path, monkeypatch, refused_port):
    uri = f"http://ferflow:pw-not-for-messages@127.0.0.1:{refused_port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = tracked(demo_workspace, tmp_path)
    start = time.monotonic()
    with pytest.raises(FerflowError) as err:
        stages.train(params, DS, MODEL)
    # "Before any epoch" is what the run dir check below proves; this only rules out MLflow's
    # retries with backoff (minutes), generously for a busy machine.
    assert time.monotonic() - start < 90
    message = str(err.value)
    assert f"127.0.0.1:{uri.rsplit(':', 1)[1]}" in message and "not reachable" in message
    assert "pw-not-for-messages" not in message and "tracking.enabled=false" in message
    assert not (tmp_path / "models").exists()  # no run dir, no history
    off = tracked(demo_workspace, tmp_path, "tracking.enabled=false", "train.full_stage.epochs=0")
    assert stages.train(off, DS, MODEL).epochs_run == 1


def _kill_tree(proc):
    """Kill the server we started (and its uvicorn child), like a crash would."""
    for child in psutil.Process(proc.pid).children(recursive=True):
        os.kill(child.pid, signal.SIGKILL)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_server_dying_mid_training_warns_once_and_training_finishes(
    demo_workspace, tmp_path, s3_server, monkeypatch, caplog
):
    (tmp_path / "server").mkdir()
    server = start_mlflow_server(tmp_path / "server", s3_server, f"dying-{uuid.uuid4().hex[:8]}")
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
        # timeout_s bounds a request to the live server (a busy machine can take seconds, which
        # would warn before the kill); after the kill connections are refused at once.
        params = tracked(demo_workspace, tmp_path, "train.full_stage.epochs=4", "tracking.max_retries=1",
                         "tracking.timeout_s=30")
        killed = {}

        class KillServerAfterEpoch2:
            def on_train_start(self, info): ...
            def on_epoch_end(self, record):
                if record["epoch"] == 2:
                    _kill_tree(server.proc)
                    killed["at"] = time.monotonic()
            def on_train_end(self, result): ...

        caplog.set_level(logging.WARNING, logger="ferflow.tracking.runs")
        result = stages.train(params, DS, MODEL, callbacks=[KillServerAfterEpoch2()])
        after_kill = time.monotonic() - killed["at"]
    finally:
        stop_process(server.proc)
    history = read_json(result.run_dir / "history.json")
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    for name in ("best.safetensors", "train_metrics.json", "run.json", "mlflow_run.json"):
        assert (result.run_dir / name).is_file(), name
    warnings = [r for r in caplog.records if r.name == "ferflow.tracking.runs" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "epoch 2" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
    # What the dead server cost: the time after the kill less the epochs' own training time.
    # Generous for a busy machine, far below a wait on the server at every logging call.
    trained_after_kill = sum(h["seconds"] for h in history if h["epoch"] > 2)
    assert after_kill - trained_after_kill < 60, (after_kill, trained_after_kill)
    # evaluation fails fast (files of training untouched) while the server is still down
    with pytest.raises(FerflowError, match="not reachable"):
        stages.evaluate(params, DS, MODEL, [DS])


SECRETS = {
    "MLFLOW_TRACKING_USERNAME": "ferflow-user",
    "MLFLOW_TRACKING_PASSWORD": "pw-7f3a9c-distinctive",
    "AWS_SECRET_ACCESS_KEY": "aws-5e1b2d-distinctive",
}
URI_SECRET = "uri-9c8d7e-distinctive"


def test_no_credentials_in_anything_logged(demo_workspace, tmp_path, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    params = tracked(demo_workspace, tmp_path, "tracking.log_system_metrics=false", "train.full_stage.epochs=1",
                     f"data.archives.{DS}.uri=https://someone:{URI_SECRET}@example.org/{DS}.zip?token={URI_SECRET}")
    stages.train(params, DS, MODEL)
    stages.evaluate(params, DS, MODEL, [DS])
    client, run = run_of(params, mlflow_server.uri)
    texts = [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(sorted(run.data.metrics))]
    for d in run.inputs.dataset_inputs:
        texts += [d.dataset.name, d.dataset.source, d.dataset.schema or "", json.dumps([(t.key, t.value) for t in d.tags])]
    texts.append((params.train.out_dir / DS / MODEL / "mlflow_run.json").read_text())
    import mlflow.artifacts

    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "dl"),
                                                     tracking_uri=mlflow_server.uri))
    files = [p for p in local.rglob("*") if p.is_file()]
    assert any(p.name == "params.yaml" for p in files) and any(p.name == "confusion.png" for p in files)
    blobs = [t.encode() for t in texts] + [p.read_bytes() for p in files]
    for secret in [SECRETS["MLFLOW_TRACKING_PASSWORD"], SECRETS["AWS_SECRET_ACCESS_KEY"], URI_SECRET]:
        assert not any(secret.encode() in b for b in blobs), secret
    # the redacted URI is still recorded (where the data came from stays known)
    assert run.data.params[f"data.archives.{DS}.uri"].startswith("https://***@example.org/")
