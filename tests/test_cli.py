"""The CLI as a user meets it: a real process, one-line errors, exit codes."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ferflow(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "ferflow.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_stage():
    result = ferflow("--help")
    assert result.returncode == 0
    for name in ("fetch", "prepare", "demo-data"):
        assert name in result.stdout
    for name in ("fetch", "prepare", "demo-data"):
        sub = ferflow(name, "--help")
        assert sub.returncode == 0 and "--params" in sub.stdout and "--set" in sub.stdout


def test_bad_override_is_one_line_exit_2():
    result = ferflow("fetch", "--set", "fetch.retries=many")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "fetch.retries" in lines[0] and "integer" in lines[0]
    assert "Traceback" not in result.stderr


def test_verbose_shows_the_traceback(tmp_path):
    result = ferflow("prepare", "--params", str(tmp_path / "missing.yaml"), "--verbose")
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "params file not found" in result.stderr


def test_unknown_dataset_is_a_clear_error():
    result = ferflow("fetch", "--dataset", "NOPE")
    assert result.returncode == 2
    assert "no archive named 'NOPE'" in result.stderr


def test_parent_run_exports_its_id_to_the_command(tmp_path):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    probe = "import os; print('child sees', os.environ['FERFLOW_PARENT_RUN_ID'])"
    result = subprocess.run(
        [sys.executable, "-m", "ferflow.cli", "parent-run", "--name", "dag-test",
         "--set", f"tracking.tracking_uri={db}", "--set", f"tracking.artifact_location={tmp_path / 'art'}",
         "--", sys.executable, "-c", probe],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in __import__("os").environ.items() if k != "MLFLOW_TRACKING_URI"},
    )
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.split("MLflow parent run ")[1].split()[0]
    assert f"child sees {run_id}" in result.stdout
    import mlflow

    run = mlflow.MlflowClient(db).get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "dag-test"
