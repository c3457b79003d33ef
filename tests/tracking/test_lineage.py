"""Lineage tags, manifest datasets, params flattening and the tracking service's
URI resolution / reachability check (no training here)."""

import json
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from ferflow.config import TrackingSettings, load_params
from ferflow.errors import FerflowError
from ferflow.tracking import service
from ferflow.tracking.lineage import dvc_lock_md5, git_tags, lineage_tags, manifest_dataset
from ferflow.tracking.payload import flatten_params
from ferflow.training.trainer import recipe_hash


from .conftest import TRAIN_OVERRIDES

REPO = Path(__file__).resolve().parents[2]
DS, MODEL = "LFW-FER", "demo_tiny"


def test_git_tags_read_the_repo_without_writing_it(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    index = REPO / ".git" / "index"
    before = index.stat().st_mtime_ns if index.exists() else None
    tags = git_tags()
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    assert tags["git.commit"] == head and tags["git.dirty"] in ("true", "false")
    assert (index.stat().st_mtime_ns if index.exists() else None) == before  # `git status` took no lock
    monkeypatch.chdir(tmp_path)
    assert git_tags() == {"git.commit": "unknown", "git.dirty": "unknown"}


def test_dvc_lock_md5(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text(
        "schema: '2.0'\nstages:\n  fetch@LFW-FER:\n    cmd: ferflow fetch --dataset LFW-FER\n    outs:\n"
        "    - path: data/raw/LFW-FER.zip\n      hash: md5\n      md5: 0123456789abcdef0123456789abcdef\n      size: 10\n"
    )
    assert dvc_lock_md5("LFW-FER", lock) == "0123456789abcdef0123456789abcdef"
    assert dvc_lock_md5("M-LFW-FER", lock) is None
    assert dvc_lock_md5("LFW-FER", tmp_path / "missing.lock") is None


def test_lineage_tags(demo_workspace, tmp_path, monkeypatch):
    secret_url = "https://someone:hunter2-secret@weights.example.org/w.pt?token=tok-secret&v=1"
    params = load_params(demo_workspace, TRAIN_OVERRIDES + [f"models.{MODEL}.pretrained={secret_url}"])
    monkeypatch.chdir(tmp_path)  # outside any git repo, with a dvc.lock
    (tmp_path / "dvc.lock").write_text(
        "stages:\n  fetch@LFW-FER:\n    outs:\n    - path: data/raw/LFW-FER.zip\n      md5: aaaabbbbccccddddaaaabbbbccccdddd\n"
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"weights_sha256": "f" * 64}))
    monkeypatch.delenv("ARGO_WORKFLOW_NAME", raising=False)
    monkeypatch.setenv("KFP_RUN_ID", "kfp-run-123")
    tags = lineage_tags(params, DS, MODEL, run_dir, stage="register")
    report = json.loads((params.data.prepared_dir / DS / "report.json").read_text())
    assert tags == {
        "git.commit": "unknown", "git.dirty": "unknown",
        "dataset.name": DS, "dataset.archive_sha256": params.data.archives[DS].sha256,
        "dataset.manifest_sha256": report["manifest_sha256"],
        "dataset.dvc_lock": "aaaabbbbccccddddaaaabbbbccccdddd",
        "model.name": MODEL,
        "model.base_checkpoint": "https://***@weights.example.org/w.pt?token=***&v=1",
        "model.base_sha256": "f" * 64,
        "recipe.hash": recipe_hash(params, DS, MODEL),
        "ferflow.version": tags["ferflow.version"], "ferflow.stage": "register", "kfp.run_id": "kfp-run-123",
    }
    assert all(isinstance(v, str) for v in tags.values())
    monkeypatch.delenv("KFP_RUN_ID")
    monkeypatch.setenv("ARGO_WORKFLOW_NAME", "wf-abc")
    assert lineage_tags(params, DS, MODEL)["kfp.run_id"] == "wf-abc"
    monkeypatch.delenv("ARGO_WORKFLOW_NAME")
    no_run = lineage_tags(params, DS, MODEL)
    assert no_run["kfp.run_id"] == "none" and no_run["model.base_sha256"] == "none"


def test_manifest_dataset(demo_workspace):
    params = load_params(demo_workspace, TRAIN_OVERRIDES)
    prepared = params.data.prepared_dir
    report = json.loads((prepared / DS / "report.json").read_text())
    manifest = pd.read_parquet(prepared / DS / "manifest.parquet")
    ds = manifest_dataset(prepared, DS, "eval")
    assert ds.name == f"{DS}/eval" and ds.digest == report["manifest_sha256"][:36]
    assert len(ds.df) == int((manifest["split"] == "eval").sum()) > 0 and set(ds.df["split"]) == {"eval"}
    assert json.loads(ds.source.to_json())["uri"] == report["archive"]["uri"]
    with pytest.raises(FerflowError, match="ferflow prepare"):
        manifest_dataset(prepared, "no-such-dataset", "eval")


def test_flatten_params_keys_values_and_limits():
    tree = {"train": {"lr": 0.1, "models": ["a", "timm:b"], "ema": {"enabled": False}, "empty": {}},
            "seed": 3, "note": None, "bad key!": "x" * 7000,
            "data": {"archives": {"A": {"uri": "https://u:pw-secret@h/a.zip"}}}}
    flat = flatten_params(tree)
    assert flat["train.lr"] == "0.1" and flat["train.models"] == '["a", "timm:b"]'
    assert flat["train.ema.enabled"] == "false" and flat["train.empty"] == "{}" and flat["note"] == "null"
    assert flat["seed"] == "3" and len(flat["bad key_"]) == 6000
    assert flat["data.archives.A.uri"] == "https://***@h/a.zip"


def test_env_uri_wins_and_what_mlflow_exports_does_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = service.configure(TrackingSettings(experiment="lineage-test", timeout_s=7.5, max_retries=1))
    db = tmp_path / "mlruns/mlflow.db"
    assert service.current_tracking_uri() == f"sqlite:///{db}" and db.is_file()
    exp = client.get_experiment(service.current_experiment_id())
    assert exp.name == "lineage-test" and exp.artifact_location == (tmp_path / "mlruns/artifacts").as_uri()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "8" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    # MLflow exported MLFLOW_TRACKING_URI itself; params still decide in this process
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{db}"
    assert service.resolve_tracking_uri(TrackingSettings(tracking_uri="sqlite:///other.db")) == "sqlite:///other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert service.resolve_tracking_uri(TrackingSettings()) == "http://127.0.0.1:1"


def test_check_reachable(mlflow_server, refused_port):
    service.check_reachable("sqlite:///whatever.db")  # local stores: nothing to check
    service.check_reachable(mlflow_server.uri, 5)
    port = refused_port
    start = time.monotonic()
    with pytest.raises(FerflowError, match=rf"http://\*\*\*@127\.0\.0\.1:{port} is not reachable"):
        service.check_reachable(f"http://user:pw-abc@127.0.0.1:{port}", 2)
    # One attempt, not MLflow's retries with backoff (minutes): a bound that a busy machine
    # cannot miss and a retrying client cannot meet.
    assert time.monotonic() - start < 60
