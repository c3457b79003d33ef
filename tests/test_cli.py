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


def _tree(root):
    return {p for p in Path(root).rglob("*")}


def test_hostile_dataset_and_model_names_are_refused_before_any_path_is_built(tmp_path):
    """Names from the command line are checked against data.archives and the zoo: `../`
    never becomes a directory, wherever the name would have been used."""
    cwd = tmp_path / "a" / "b" / "c"
    cwd.mkdir(parents=True)
    params = cwd / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    run_dir = cwd / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{}")
    before = _tree(tmp_path)
    db = ["--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    cases = [
        (["register", "-d", "LFW-FER", "-m", "../../../X", "--run-dir", str(run_dir), *db], "../../../X"),
        (["register", "-d", "../../../X", "-m", "demo_tiny", "--run-dir", str(run_dir), *db], "../../../X"),
        (["register", "-d", "LFW-FER", "-m", " demo_tiny", "--run-dir", str(run_dir), *db], "' demo_tiny'"),
        (["evaluate", "-d", "LFW-FER", "-m", "demo_tiny", "--on", "../../etc"], "../../etc"),
        (["evaluate", "--zero-shot", "-m", "../x"], "../x"),
        (["train", "-d", "../x", "-m", "demo_tiny"], "../x"),
        (["prepare", "-d", "../x"], "../x"),
        (["promote", "-d", "../../x", *db], "../../x"),
    ]
    for args, name in cases:
        result = ferflow(*args, cwd=cwd)
        assert result.returncode == 2, (args, result.stderr)
        assert name in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
    assert _tree(tmp_path) == before  # nothing written anywhere, inside the workspace or above it


def test_kfp_task_names_are_checked_too():
    import pytest

    from ferflow.config import load_params
    from ferflow.errors import ConfigError
    from ferflow import stages
    from ferflow.pipeline import glue

    params = load_params(REPO / "params.yaml")
    with pytest.raises(ConfigError, match=r"'\.\./x'"):
        glue.prepare_at(params, ["../x"], "demo_tiny")
    with pytest.raises(ConfigError, match=r"'\.\./x'"):
        glue.prepare_at(params, ["LFW-FER"], "../x")
    with pytest.raises(ConfigError, match=r"'\.\./x'"):
        glue.run_dir(params, "LFW-FER", "../x")
    with pytest.raises(ConfigError, match=r"'\.\./x'"):
        stages.fetch(params, ["../x"])
