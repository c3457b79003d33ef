"""The demo workspace the e2e tests share: built like `make demo` builds demo/ (same dvc.yaml,
remote config and git repository, scripts/demo-git.sh), on small demo params, reproduced once
per test session (`demo_repro`). Tests read it or work on their own copy."""

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEMO_GIT = REPO / "scripts" / "demo-git.sh"
# Small enough for a quick repro; the DAG and its files are the full demo's. Its near-chance
# models still get a first champion, as the full demo's do, for the commands on @champion.
DEMO_OVERRIDES = ("['prepare.image_sizes=[32]', 'train.models=[demo_tiny]', 'train.input_size=32',"
                  " 'train.full_stage.epochs=1', 'train.workers=0', 'registry.first_champion_min=0']")


def run(cmd, cwd, env=None, check=True):
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    result = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def demo_mlflow_env(ws: Path) -> dict[str, str]:
    """The environment `make demo` leaves a user with: the store its runs went to (the line it
    prints), and no MLflow telemetry thread offline."""
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}", "MLFLOW_DISABLE_TELEMETRY": "true"}


def relocate(db: Path, old: Path, new: Path) -> None:
    """Point the absolute paths MLflow stored (experiment, run and model artifact locations)
    at a copy, so the runs and models made in the copy land in it, not in the original."""
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for _, column, kind, *_ in con.execute(f'PRAGMA table_info("{table}")').fetchall():
                if "CHAR" in kind.upper() or "TEXT" in kind.upper():
                    con.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                                f'WHERE instr("{column}", ?) > 0', (str(old), str(new), str(old)))


def copy_demo_workspace(ws: Path, dest: Path) -> Path:
    """A copy of a demo workspace that is a workspace of its own: its git repository, DVC
    cache and MLflow store (relocated) come along; `src` stays a link to the same snapshot."""
    shutil.copytree(ws, dest, symlinks=True)
    relocate(dest / "mlruns" / "mlflow.db", ws, dest)
    return dest


@pytest.fixture(scope="package")
def demo_repro(tmp_path_factory):
    """(workspace, output of its first `dvc repro`), the workspace committed as `make demo`
    commits it. Read it, never change it: take a copy (symlinks=True) to change anything."""
    root = tmp_path_factory.mktemp("dvc-demo")
    ws = root / "ws"
    # No global git identity here, as on a fresh CI machine: the script sets a local one.
    run(["bash", str(DEMO_GIT), "begin", str(ws)], cwd=root,
        env={"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"})
    # `make demo` links src; here the link points at a snapshot of it, so the stages' src deps
    # do not change under the tests when src is edited while they run (a rerun, not a test).
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    run(["ferflow", "demo-data", "--out", "archives", "--params-out", "params.yaml",
         "--params", str(REPO / "params.yaml"),
         "--set", "demo.images_per_class=20", "--set", "demo.image_size=48",
         "--set", f"demo.overrides={DEMO_OVERRIDES}"], cwd=ws)
    shutil.copy(REPO / "dvc.yaml", ws / "dvc.yaml")
    (ws / "src").symlink_to(root / "src")
    run(["dvc", "init", "-q"], cwd=ws)
    # the repo's committed remote, as DVC itself reads it
    name, url = run(["dvc", "remote", "list"], cwd=REPO).stdout.split()[:2]
    run(["dvc", "remote", "add", "-d", name, url], cwd=ws)
    shutil.copy(REPO / ".dvcignore", ws / ".dvcignore")
    out = run(["dvc", "repro"], cwd=ws, env=demo_mlflow_env(ws)).stdout
    run(["bash", str(DEMO_GIT), "commit", str(ws), "make demo: dvc repro"], cwd=root)
    return ws, out
