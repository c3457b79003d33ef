"""Usage errors fail before any work (issue 13, item 1): a missing prepare, an unknown model,
missing weights or a missing cache exit non-zero with one line, and the MLflow store holds
no run afterwards (none created, none left FAILED)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DS = "LFW-FER"


@pytest.fixture
def workspace(tmp_path):
    """A params file whose data, outputs and sqlite store all live in tmp_path."""
    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    tree["data"].update(raw_dir=str(tmp_path / "raw"), prepared_dir=str(tmp_path / "prepared"))
    tree["train"]["out_dir"] = str(tmp_path / "models")
    tree["evaluate"]["out_dir"] = str(tmp_path / "evaluation")
    tree["tracking"].update(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                            artifact_location=str(tmp_path / "artifacts"), log_system_metrics=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))
    return tmp_path


def ferflow(ws, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FERFLOW_PARENT", "DVC_"))}
    env["FERFLOW_CACHE"] = str(ws / "cache")
    return subprocess.run([sys.executable, "-m", "ferflow.cli", *args, "--params", str(ws / "params.yaml")],
                          cwd=ws, capture_output=True, text=True, timeout=300, env=env)


def assert_one_line_and_no_run(ws, done, expected):
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0 and len(lines) == 1, done.stderr[-3000:]
    assert expected in lines[0] and "Traceback" not in done.stderr, lines
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    assert client.search_runs(ids, run_view_type=ViewType.ALL) == []


@pytest.mark.parametrize("args, expected", [
    (["--model", "demo_tiny"], f"dataset {DS} is not prepared"),
    (["--model", "tiny"], "unknown model 'tiny'"),
])
def test_train_usage_errors_leave_no_run(workspace, args, expected):
    done = ferflow(workspace, "train", "--dataset", DS, *args)
    assert_one_line_and_no_run(workspace, done, expected)


def fake_prepared(ws, dataset, sizes=()):
    """A prepared dataset folder (manifest present) with caches at `sizes` only."""
    import numpy as np

    root = ws / "prepared" / dataset
    root.mkdir(parents=True)
    (root / "manifest.parquet").write_bytes(b"")
    for size in sizes:
        cache = root / "cache" / str(size)
        cache.mkdir(parents=True)
        for split in ("train", "val", "eval"):
            np.save(cache / f"{split}.npy", np.zeros((2, size, size, 3), np.uint8))
            np.save(cache / f"{split}.labels.npy", np.zeros(2, np.int64))


def test_train_with_missing_weights_or_cache_size_leaves_no_run(workspace):
    fake_prepared(workspace, DS, sizes=[32])
    done = ferflow(workspace, "train", "--dataset", DS, "--model", "demo_tiny")  # demo_tiny trains at 64
    assert_one_line_and_no_run(workspace, done, "at size 64; run `ferflow prepare` with 64")
    done = ferflow(workspace, "train", "--dataset", DS, "--model", "demo_tiny", "--set", "train.input_size=32",
                   "--set", f"models.demo_tiny.pretrained={workspace / 'nowhere.safetensors'}")
    assert_one_line_and_no_run(workspace, done, "pretrained weights not found")


def fake_run(ws, model="demo_tiny", size=64, recorded_run=False):
    run = ws / "models" / DS / model
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"model": model, "input_size": size, "classes": ["a", "b", "c"]}))
    (run / "best.safetensors").write_bytes(b"")
    if recorded_run:
        (run / "mlflow_run.json").write_text(json.dumps({"run_id": "0" * 32}))
    return run


def test_evaluate_with_a_missing_cache_leaves_no_run(workspace):
    fake_run(workspace, recorded_run=True)
    fake_prepared(workspace, DS, sizes=[64])
    fake_prepared(workspace, "M-LFW-FER", sizes=[32])
    done = ferflow(workspace, "evaluate", "--dataset", DS, "--model", "demo_tiny", "--on", DS, "--on", "M-LFW-FER")
    assert_one_line_and_no_run(workspace, done, "no image cache for split 'eval' at size 64")
    assert not (workspace / "evaluation").exists()


def test_register_without_an_evaluation_leaves_no_run(workspace):
    fake_run(workspace)
    done = ferflow(workspace, "register", "--dataset", DS, "--model", "demo_tiny")
    assert_one_line_and_no_run(workspace, done, "run `ferflow evaluate --dataset LFW-FER --model demo_tiny` first")
