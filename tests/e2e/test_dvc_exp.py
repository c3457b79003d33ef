"""The repo's DVC project with git SCM: in a clone of the committed repository, demo params
and archives committed, `dvc repro` runs the DAG, `dvc exp run -S ...` reruns training only
and `dvc exp show` / `metrics show` / `plots show` read the results. MLflow: a temporary sqlite.

One `dvc repro` per module (`reproduced`); every test works on its own copy of that clone and
its MLflow store (`clone`), so tests pass alone, in any order and with `-k`."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from .conftest import relocate, run

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow

# Two of the three datasets keep the run short; fetch and prepare still cover all archives.
ARCHIVES = ("LFW-FER", "M-LFW-FER", "M-LFW-FER-face-cut")
DATASETS = ("LFW-FER", "M-LFW-FER")
MODEL = "demo_tiny"
OVERRIDES = ("['prepare.image_sizes=[32]', 'train.datasets=[LFW-FER, M-LFW-FER]', 'train.models=[demo_tiny]',"
             " 'train.input_size=32', 'train.full_stage.epochs=1', 'train.workers=0',"
             " 'registry.first_champion_min=0']")  # near-chance models still get a first champion


def train_metrics(dataset):
    return f"models/{dataset}/{MODEL}/train_metrics.json"


def mlflow_env(root: Path) -> dict[str, str]:
    # Offline: no MLflow telemetry thread (it pops an env var while ferflow iterates os.environ).
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "MLFLOW_DISABLE_TELEMETRY": "true"}


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """(root, output of the first `dvc repro`): root/repo is a git clone of HEAD with the demo
    params + archives committed, reproduced and committed again; root/mlflow.db its MLflow
    store. Read it, never change it: tests take a copy (`clone`)."""
    root = tmp_path_factory.mktemp("dvc-exp")
    ws = root / "repo"
    run(["git", "clone", "-q", str(REPO), str(ws)], cwd=root)
    for key, value in (("user.name", "ferflow test"), ("user.email", "test@ferflow.invalid"),
                       ("commit.gpgsign", "false")):
        run(["git", "config", key, value], cwd=ws)
    run(["ferflow", "demo-data", "--out", "archives", "--params-out", "params.yaml", "--params", "params.yaml",
         "--set", "demo.images_per_class=20", "--set", "demo.image_size=48",
         "--set", f"demo.overrides={OVERRIDES}"], cwd=ws)
    run(["git", "add", "params.yaml", "archives"], cwd=ws)
    run(["git", "commit", "-q", "-m", "demo params and archives"], cwd=ws)
    assert run(["git", "status", "--porcelain"], cwd=ws).stdout == ""
    out = run(["dvc", "repro"], cwd=ws, env=mlflow_env(root)).stdout
    run(["git", "add", "-A"], cwd=ws)  # dvc.lock, .gitignore files DVC wrote, uncached metrics/plots
    run(["git", "commit", "-q", "-m", "dvc repro"], cwd=ws)
    return root, out


@pytest.fixture
def clone(reproduced, tmp_path):
    """(workspace, env) of this test's own copy of the reproduced clone and its MLflow store."""
    root = Path(shutil.copytree(reproduced[0], tmp_path / "root", symlinks=True))
    relocate(root / "mlflow.db", reproduced[0], root)
    return root / "repo", mlflow_env(root)


def test_repro_runs_every_stage_then_nothing(reproduced, clone):
    ws, env = clone
    out = reproduced[1]
    stages = [f"fetch@{a}" for a in ARCHIVES] + [f"prepare@{a}" for a in ARCHIVES]
    stages += [f"{s}@{d}-{MODEL}" for s in ("train", "evaluate", "register") for d in DATASETS]
    stages += [f"zero-shot@{MODEL}", "report"] + [f"promote@{d}" for d in DATASETS]
    for stage in stages:
        assert f"Running stage '{stage}'" in out, stage
    # the fixture committed everything the repro wrote
    assert run(["git", "status", "--porcelain"], cwd=ws).stdout == ""
    # Uncached metrics belong in git, or no other revision (baseline, experiments) can show them.
    tracked = run(["git", "ls-files"], cwd=ws).stdout.splitlines()
    for dataset in DATASETS:
        assert train_metrics(dataset) in tracked, f"{train_metrics(dataset)} is git-ignored (.gitignore: /models/)"

    second = run(["dvc", "repro"], cwd=ws, env=env).stdout
    assert "Running stage" not in second
    assert "Data and pipelines are up to date" in second


def test_exp_run_reruns_training_only(clone):
    ws, env = clone
    out = run(["dvc", "exp", "run", "-S", "train.full_stage.epochs=2"], cwd=ws, env=env).stdout
    for dataset in DATASETS:
        assert f"Running stage 'train@{dataset}-{MODEL}'" in out
    assert "Running stage 'fetch@" not in out and "Running stage 'prepare@" not in out
    assert f"Running stage 'zero-shot@{MODEL}'" not in out  # no dependency on train
    name = out.split("Ran experiment(s):")[1].split()[0]

    # The trial registered its models under its own name and left each champion in place.
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    for dataset in DATASETS:
        registered = f"ferflow-{dataset.lower()}"
        trial = [v for v in client.search_model_versions(f"name='{registered}'")
                 if v.tags.get("dvc.experiment") == name]
        assert trial, f"{registered}: no version tagged dvc.experiment={name}"
        champion = str(client.get_registered_model(registered).aliases["champion"])
        assert champion not in {str(v.version) for v in trial}
        decision = json.loads((ws / "registry" / "promotions" / f"{dataset}.json").read_text())
        assert decision["action"] == "skipped" and decision["champion_after"] == champion

    rows = json.loads(run(["dvc", "exp", "show", "--json"], cwd=ws).stdout)
    baseline = next(r for r in rows if r["rev"] != "workspace")
    exp = next(rev for e in baseline["experiments"] or [] for rev in e["revs"] if rev["name"] == name)

    def epochs(row):
        return row["data"]["params"]["params.yaml"]["data"]["train"]["full_stage"]["epochs"]

    assert (epochs(baseline), epochs(exp)) == (1, 2)
    for dataset in DATASETS:
        base_m = baseline["data"]["metrics"][train_metrics(dataset)]
        exp_m = exp["data"]["metrics"][train_metrics(dataset)]
        assert "data" in base_m and "data" in exp_m, (base_m, exp_m)
        assert 0.0 <= exp_m["data"]["val_accuracy"] <= 1.0
        # head epoch + full epochs: one more in the experiment (early stopping is off in the demo)
        assert exp_m["data"]["epochs_run"] == base_m["data"]["epochs_run"] + 1


def test_metrics_and_plots_show(clone, tmp_path):
    ws, _ = clone
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], cwd=ws).stdout)[""]["data"]
    for dataset in DATASETS:
        assert "val_accuracy" in metrics[train_metrics(dataset)]["data"]

    plots = json.loads(run(["dvc", "plots", "show", "--json"], cwd=ws).stdout)
    assert not plots.get("errors"), plots.get("errors")
    for dataset in DATASETS:
        (curve,) = plots["data"][f"models/{dataset}/{MODEL}/history.csv"]
        assert curve["content"]["data"]["values"] and "val_accuracy" in json.dumps(curve["content"])
        (confusion,) = plots["data"][f"evaluation/fine-tuned/{dataset}/{MODEL}.predictions.csv"]
        values = confusion["content"]["data"]["values"]
        assert values and {"actual", "predicted"} <= set(values[0])
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], cwd=ws)
    assert (tmp_path / "plots" / "index.html").stat().st_size > 0
