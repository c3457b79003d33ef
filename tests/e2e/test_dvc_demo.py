"""`dvc repro` of the repo's dvc.yaml on demo data in a fresh workspace, then `dvc push` to
and `dvc pull` from an S3 API server process on 127.0.0.1, through the repo's remote config."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ferflow.data.sources import sha256_file

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def run(cmd, cwd, env=None, check=True):
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    result = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A DVC workspace like `make demo` builds: same dvc.yaml and remote config, demo params."""
    ws = tmp_path_factory.mktemp("dvc-demo")
    run(["ferflow", "demo-data", "--out", "archives", "--params-out", "params.yaml",
         "--params", str(REPO / "params.yaml"),
         "--set", "demo.images_per_class=20", "--set", "demo.image_size=48",
         "--set", "demo.overrides=['prepare.image_sizes=[32]', 'train.models=[demo_tiny]', 'train.input_size=32',"
                  " 'train.full_stage.epochs=1', 'train.workers=0']"], cwd=ws)
    shutil.copy(REPO / "dvc.yaml", ws / "dvc.yaml")
    (ws / "src").symlink_to(REPO / "src")
    run(["dvc", "init", "--no-scm", "-q"], cwd=ws)
    # the repo's committed remote, as DVC itself reads it
    name, url = run(["dvc", "remote", "list"], cwd=REPO).stdout.split()[:2]
    run(["dvc", "remote", "add", "-d", name, url], cwd=ws)
    shutil.copy(REPO / ".dvcignore", ws / ".dvcignore")
    return ws


def test_repro_runs_every_stage_then_nothing(workspace):
    first = run(["dvc", "repro"], cwd=workspace).stdout
    for stage in ("fetch@LFW-FER", "fetch@M-LFW-FER", "prepare@M-LFW-FER-face-cut", "train@LFW-FER-demo_tiny",
                  "evaluate@M-LFW-FER-demo_tiny", "zero-shot@demo_tiny", "report"):
        assert f"Running stage '{stage}'" in first
    assert "| M-LFW-FER | demo_tiny |" in (workspace / "reports/results.md").read_text()
    metrics = run(["dvc", "metrics", "show", "--json"], cwd=workspace).stdout
    assert "val_accuracy" in metrics and "LFW-FER" in metrics
    report = json.loads((workspace / "data/prepared/M-LFW-FER/report.json").read_text())
    assert report["n_images"] == 60 and report["quarantined"] == []
    assert {s["reason"] for s in report["skipped"]} == {"macOS resource fork", "macOS folder metadata"}
    second = run(["dvc", "repro"], cwd=workspace).stdout
    assert "Running stage" not in second
    assert "Data and pipelines are up to date" in second
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    assert {"fetch@LFW-FER", "prepare@LFW-FER"} <= set(lock["stages"])


def test_workers_and_threads_rerun_nothing(workspace):
    """How a run is executed is not what it computes: dvc.yaml lists only recipe keys."""
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["train"]["workers"], params["train"]["threads"] = 1, 1
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], cwd=workspace).stdout
    assert "Running stage" not in out and "Data and pipelines are up to date" in out


def test_changing_a_param_reruns_only_prepare(workspace):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["prepare"]["max_bad_fraction"] = 0.05
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], cwd=workspace).stdout
    assert "Running stage 'prepare@LFW-FER'" in out and "Running stage 'fetch@" not in out


def test_push_and_pull_through_the_s3_remote(workspace, s3_server):
    env = s3_server.env()
    s3_server.make_bucket("ferflow-dvc-test")
    # What a user does: point the committed `storage` remote at their bucket, locally.
    run(["dvc", "remote", "modify", "--local", "storage", "url", "s3://ferflow-dvc-test/store"], cwd=workspace)
    run(["dvc", "push"], cwd=workspace, env=env)
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket="ferflow-dvc-test").get("Contents", [])]
    assert keys and all(k.startswith("store/files/md5/") for k in keys)

    expected = {p.name: sha256_file(p) for p in (workspace / "data/raw").glob("*.zip")}
    assert len(expected) == 3
    shutil.rmtree(workspace / "data")
    shutil.rmtree(workspace / ".dvc" / "cache")
    run(["dvc", "pull"], cwd=workspace, env=env)
    assert {p.name: sha256_file(p) for p in (workspace / "data/raw").glob("*.zip")} == expected
    assert (workspace / "data/prepared/LFW-FER/manifest.parquet").is_file()
    status = run(["dvc", "status"], cwd=workspace).stdout
    assert "up to date" in status
    # no credential reached the workspace's files
    for path in workspace.rglob("*"):
        if path.is_file() and ".dvc/cache" not in str(path) and path.stat().st_size < 1_000_000:
            assert s3_server.secret_key.encode() not in path.read_bytes(), path
