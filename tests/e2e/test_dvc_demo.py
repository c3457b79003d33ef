"""`dvc repro` of the repo's dvc.yaml on demo data in a fresh workspace, then `dvc push` to
and `dvc pull` from an S3 API server process on 127.0.0.1, through the repo's remote config;
the workspace's own git repository (scripts/demo-git.sh) and the DVC commands it enables.

One `dvc repro` per session (`demo_repro`, conftest.py); every test works on its own copy of
that workspace (`workspace`), so tests pass alone, in any order and with `-k`."""

import json
import math
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ferflow.fileio import sha256_file

from .conftest import DEMO_GIT, copy_demo_workspace, demo_mlflow_env, run

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow
ARCHIVES = ("LFW-FER", "M-LFW-FER", "M-LFW-FER-face-cut")


@pytest.fixture(scope="module")
def reproduced(demo_repro):
    """(workspace, output of its first `dvc repro`): the shared demo workspace (conftest.py),
    a DVC workspace and git repository like `make demo` builds. Read it, never change it."""
    return demo_repro


@pytest.fixture
def workspace(reproduced, tmp_path):
    """This test's own copy of the reproduced workspace (params, data and remotes change).
    Paths inside are relative (archives, outputs) but for the `src` link, copied as a link to
    the same snapshot, and MLflow's, relocated to the copy, so the copy is the same workspace."""
    return copy_demo_workspace(reproduced[0], tmp_path / "ws")


def test_repro_runs_every_stage_then_nothing(reproduced, workspace):
    first = reproduced[1]
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


def write_fer7_always_happy(path: Path, happiness_logit: float) -> None:
    """fer7_b0_112's architecture (EfficientNet-B0, HSEmotion's 7-class head) whose head
    ignores the image: logits 0 except Happiness. Random trunk: built here, nothing fetched."""
    import safetensors.torch
    import torch

    from ferflow.models import zoo

    entry = zoo.resolve("fer7_b0_112")
    model = zoo.build_model(entry)  # random init, the pretrained head's shape and layout
    head = model.classifier[0]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[entry.classes.index("Happiness")] = happiness_logit
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def test_zero_shot_stage_maps_a_pretrained_head_to_three_classes(workspace):
    """The demo model has no expression head, so the DAG records its zero-shot as skipped.
    The same stage on a model with a 7-class head runs the real path: pretrained weights
    loaded strictly, the head's probabilities collapsed onto 3 classes, a row in the report."""
    skipped = json.loads((workspace / "evaluation/zero-shot/none/demo_tiny.json").read_text())
    assert "no pretrained facial-expression head" in skipped["skipped"]

    # Softmax over the 6 kept classes (Surprise is ignored): Happiness e^b/(e^b + 5) goes to
    # positive, Anger, Disgust, Fear and Sadness 4/(e^b + 5) to negative, Neutral 1/(e^b + 5).
    weights = workspace.parent / "fer7-always-happy.safetensors"
    write_fer7_always_happy(weights, math.log(15.0))
    expected = {"p_positive": 0.75, "p_negative": 0.2, "p_neutral": 0.05}
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["train"]["models"] = ["demo_tiny", "fer7_b0_112"]
    params["models"]["fer7_b0_112"] = {"pretrained": str(weights)}
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    out = run(["dvc", "repro", "zero-shot@fer7_b0_112"], cwd=workspace).stdout
    assert "Running stage 'zero-shot@fer7_b0_112'" in out and "Running stage 'train@" not in out
    root = workspace / "evaluation/zero-shot/none"
    summary = json.loads((root / "fer7_b0_112.json").read_text())
    assert "skipped" not in summary and set(summary) == set(ARCHIVES), summary
    for dataset, row in summary.items():
        # Every face is called positive; a third of each balanced eval split is.
        assert 0.0 <= row["accuracy"] <= 1.0 and row["accuracy"] == pytest.approx(1 / 3), (dataset, row)
        assert row["n"] == 15 and 0.0 <= row["macro_f1"] <= 1.0
        predictions = pd.read_csv(root / "fer7_b0_112" / dataset / "predictions.csv")
        assert set(predictions["predicted"]) == {"positive"} and len(predictions) == row["n"]
        for column, p in expected.items():
            assert predictions[column].to_numpy() == pytest.approx(p, abs=1e-5), column

    run(["ferflow", "report"], cwd=workspace)
    results = pd.read_csv(workspace / "reports/results.csv")
    rows = results[(results["stage"] == "zero-shot") & (results["model"] == "fer7_b0_112")]
    assert sorted(rows["eval_dataset"]) == sorted(ARCHIVES) and (rows["accuracy"] == summary["LFW-FER"]["accuracy"]).all()
    assert "| LFW-FER | fer7_b0_112 |" in (workspace / "reports/results.md").read_text()


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


def git(args, cwd):
    return run(["git", *args], cwd=cwd).stdout.strip()


def test_the_workspace_is_a_git_repository_of_its_own(workspace):
    """As `make demo` leaves demo/: everything but DVC's cached outputs and the MLflow store
    committed, with a local identity where git has none (the fixture ran without one)."""
    assert git(["rev-parse", "--show-toplevel"], workspace) == str(workspace)
    assert git(["status", "--porcelain"], workspace) == ""
    assert git(["rev-list", "--count", "HEAD"], workspace) == "1"
    assert git(["config", "--local", "user.email"], workspace) == "demo@ferflow.invalid"
    tracked = set(git(["ls-files"], workspace).splitlines())
    assert {"dvc.lock", "dvc.yaml", "params.yaml", "src", "reports/results.md",
            "models/LFW-FER/demo_tiny/train_metrics.json", "registry/promotions/LFW-FER.json"} <= tracked
    assert not [p for p in tracked if p.startswith(("data/", "mlruns/", ".dvc/cache/", ".dvc/tmp/"))
                or p.endswith((".safetensors", ".pt", ".npy", ".parquet"))]


def demo_git(action, workspace, *message):
    return run(["bash", str(DEMO_GIT), action, str(workspace), *message], cwd=workspace).stdout


def test_make_demo_commits_only_the_changes_its_run_made(workspace):
    def count():
        return git(["rev-list", "--count", "HEAD"], workspace)

    # A rerun that changes nothing commits nothing.
    demo_git("begin", workspace)
    assert "nothing changed" in demo_git("commit", workspace, "make demo: dvc repro")
    assert count() == "1"
    # What the run changes (here: a newer dvc.yaml copied in) is committed.
    demo_git("begin", workspace)
    with open(workspace / "dvc.yaml", "a") as f:
        f.write("# changed upstream\n")
    assert "committed" in demo_git("commit", workspace, "make demo: dvc repro")
    assert count() == "2" and git(["status", "--porcelain"], workspace) == ""
    # Changes of the user's, there before the run started, are left to the user.
    with open(workspace / "params.yaml", "a") as f:
        f.write("# mine\n")
    demo_git("begin", workspace)
    assert "not committed" in demo_git("commit", workspace, "make demo: dvc repro")
    assert count() == "2" and git(["status", "--porcelain"], workspace) == "M params.yaml"


def test_a_workspace_made_without_git_becomes_one_without_committing_outputs(workspace):
    """demo/ from before it was a git repository (`dvc init --no-scm`): the next make demo
    turns it into one, and DVC's outputs are git-ignored before anything is committed."""
    shutil.rmtree(workspace / ".git")
    for ignore in workspace.rglob(".gitignore"):  # DVC writes none without git
        ignore.unlink()
    run(["dvc", "config", "core.no_scm", "true"], cwd=workspace)
    demo_git("begin", workspace)
    assert "no_scm" not in (workspace / ".dvc" / "config").read_text()
    demo_git("commit", workspace, "make demo: dvc repro")
    tracked = git(["ls-files"], workspace).splitlines()
    assert "dvc.lock" in tracked and "models/LFW-FER/demo_tiny/train_metrics.json" in tracked
    assert not [p for p in tracked if p.startswith((".dvc/cache/", ".dvc/tmp/", "mlruns/"))
                or p.endswith((".zip", ".safetensors", ".pt", ".npy")) and not p.startswith("archives/")]
    assert "Data and pipelines are up to date" in run(["dvc", "status"], cwd=workspace).stdout


def test_dvc_experiments_and_diffs_work_in_the_workspace(workspace):
    """The commands `Only supported for Git repositories` refused in a no-scm workspace."""
    env = demo_mlflow_env(workspace)
    out = run(["dvc", "exp", "run", "-S", "registry.min_delta=0.01"], cwd=workspace, env=env).stdout
    assert "Running stage 'promote@LFW-FER'" in out and "Running stage 'train@" not in out
    name = out.split("Ran experiment(s):")[1].split()[0]
    rows = json.loads(run(["dvc", "exp", "show", "--json"], cwd=workspace).stdout)
    baseline = next(r for r in rows if r["rev"] != "workspace")
    (exp,) = [rev for e in baseline["experiments"] or [] for rev in e["revs"] if rev["name"] == name]

    def min_delta(row):
        return row["data"]["params"]["params.yaml"]["data"]["registry"]["min_delta"]

    assert (min_delta(baseline), min_delta(exp)) == (0.0, 0.01)
    params = json.loads(run(["dvc", "params", "diff", "--json"], cwd=workspace).stdout)
    change = params["params.yaml"]["registry.min_delta"]
    assert (change["old"], change["new"]) == (0.0, 0.01)
    # The experiment's metrics are the baseline's (it retrained nothing): an empty diff; a
    # metric that differs from the commit's is named.
    assert json.loads(run(["dvc", "metrics", "diff", "--json"], cwd=workspace).stdout) == {}
    metrics_file = workspace / "models/LFW-FER/demo_tiny/train_metrics.json"
    metrics = json.loads(metrics_file.read_text())
    metrics["val_accuracy"] = 2.0
    metrics_file.write_text(json.dumps(metrics))
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], cwd=workspace).stdout)
    assert diff["models/LFW-FER/demo_tiny/train_metrics.json"]["val_accuracy"]["new"] == 2.0
