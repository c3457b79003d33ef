"""The whole pipeline under kfp.local (SubprocessRunner, this venv) on tiny demo archives:
it ends with a registered, promoted model in a local MLflow store and the KFP artifacts
the UI would show (metrics, confusion matrix, Markdown table, model metadata). It runs
twice with the same inputs: the cached tasks' outputs are the same, the second version is
registered and refused by the gate (no better than the champion)."""

import hashlib

import json
from pathlib import Path

import pytest
import yaml

from ferflow import stages
from ferflow.config import load_params
from ferflow.pipeline import glue
from ferflow.pipeline.spec import CompileOptions, PipelineDefaults, load_builder

from . import REPO

pytestmark = pytest.mark.slow

DATASET, MODEL = "LFW-FER", "demo_tiny"
# Tiny everything: the run checks plumbing, not accuracy (~1 min on 2 busy cores).
OVERRIDES = [
    "prepare.image_sizes=[32]", "prepare.workers=1", "train.input_size=32", "train.batch_size=16",
    "train.head_stage.epochs=1", "train.full_stage.epochs=1", "train.workers=0", "tracking.log_system_metrics=false",
    "registry.first_champion_min=0",  # a near-chance model may serve first: plumbing, not accuracy
]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    import kfp.local

    tmp = tmp_path_factory.mktemp("kfp-local")
    demo = load_params(REPO / "params.yaml", ["demo.images_per_class=20", "demo.image_size=48"])
    archives = stages.demo_data(demo, out_dir=tmp / "archives")
    roots = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # tasks start here: nothing lands in the checkout
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        mp.delenv("KFP_RUN_ID", raising=False)
        pipeline = load_builder(REPO)(CompileOptions(), PipelineDefaults.from_checkout(REPO))
        for attempt in ("first", "second"):
            kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp / attempt))
            pipeline(
                archives={a.name: {"uri": str(a.path), "sha256": a.sha256, "size": a.size} for a in archives},
                datasets=[DATASET], models=[MODEL], matrix=glue.matrix([DATASET], [MODEL]),
                overrides=OVERRIDES, experiment="kfp-local", dvc_lock={}, dvc_remote="",
            )
            (run_root,) = (tmp / attempt).iterdir()
            roots.append(run_root)
    return tmp, roots[0], roots[1]


def _outputs(run_root: Path, task: str) -> dict:
    (path,) = run_root.glob(f"**/{task}/executor_output.json")
    return json.loads(path.read_text())


def _artifact(outputs: dict, name: str) -> dict:
    return outputs["artifacts"][name]["artifacts"][0]


def test_model_is_registered_and_promoted_with_the_kfp_run_id(local_run):
    from mlflow import MlflowClient

    tmp, first, second = local_run
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db", registry_uri=f"sqlite:///{tmp}/mlflow.db")
    champion = client.get_model_version_by_alias("ferflow-lfw-fer", "champion")
    assert str(champion.version) == "1" and champion.tags["promotion.decision"] == "promoted"
    # The run id reaches register as an input (the placeholder resolved); cached tasks
    # never see it (on a cluster they read the pod label, which kfp.local does not have).
    run_ids = [champion.tags["kfp.run_id"], client.get_model_version("ferflow-lfw-fer", "2").tags["kfp.run_id"]]
    assert all(r not in ("none", "") and "{{" not in r for r in run_ids) and run_ids[0] != run_ids[1]
    run = client.get_run(champion.run_id)
    assert run.data.metrics["eval_M-LFW-FER_accuracy"] >= 0  # evaluated across datasets
    (decision,) = json.loads(_outputs(second, "promote")["parameterValues"]["Output"])
    assert decision["action"] == "refused" and decision["champion_after"] == "1"  # equal, not better


def _digest(uri: str) -> str:
    """sha256 over a file or a folder's files (relative path + content)."""
    path, digest = Path(uri), hashlib.sha256()
    for file in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        if file.name in ("mlflow_run.json", "run.json", "history.json", "history.csv", "train_metrics.json") or \
                file.name.endswith(".verified"):
            continue  # MLflow run ids, timings and file times (verify stamps) differ between runs by nature
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        digest.update(_content(file))
    return digest.hexdigest()


def _content(file: Path) -> bytes:
    """File bytes; for safetensors the tensors and sorted metadata (the header's key order
    follows a hash map's, which differs between processes)."""
    if file.suffix != ".safetensors":
        return file.read_bytes()
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        parts = [json.dumps(handle.metadata(), sort_keys=True).encode()]
        for key in sorted(handle.keys()):
            parts += [key.encode(), handle.get_tensor(key).numpy().tobytes()]
    return b"".join(parts)


def test_the_same_inputs_give_the_same_outputs(local_run):
    """What KFP's cache would serve on a resubmission is what a rerun computes: the cached
    tasks' output artifacts have the same content (weights included) in both runs."""
    _, first, second = local_run
    outputs = {"fetch": ("config", "raw"), "train": ("model", "reports"), "evaluate": ("evaluation",),
               "zero-shot": ("evaluation",), "report": ("table",)}
    for task, names in outputs.items():
        for name in names:
            a, b = (_artifact(_outputs(root, task), name) for root in (first, second))
            assert _digest(a["uri"]) == _digest(b["uri"]), (task, name)
    metrics = [_artifact(_outputs(root, "evaluate"), "metrics")["metadata"] for root in (first, second)]
    assert metrics[0] == metrics[1]


def test_kfp_artifacts_for_the_ui(local_run):
    _, run_root, _ = local_run
    fetched = _outputs(run_root, "fetch")
    config = yaml.safe_load(Path(_artifact(fetched, "config")["uri"]).read_text())
    assert config["train"]["full_stage"]["epochs"] == 1 and config["tracking"]["experiment"] == "kfp-local"
    assert set(_artifact(fetched, "raw")["metadata"]["archives"]) == {"LFW-FER", "M-LFW-FER", "M-LFW-FER-face-cut"}

    train = _outputs(run_root, "train")
    model = _artifact(train, "model")
    assert model["metadata"]["format"] == "safetensors" and int(model["metadata"]["input_size"]) == 32
    assert model["metadata"]["classes"] == ["negative", "neutral", "positive"]
    run_dir = Path(model["uri"]) / DATASET / MODEL
    assert (run_dir / "best.safetensors").is_file() and not (run_dir / "last.pt").exists()
    assert "val_accuracy" in _artifact(train, "metrics")["metadata"]

    evaluate = _outputs(run_root, "evaluate")
    metrics = _artifact(evaluate, "metrics")["metadata"]
    assert {"accuracy", "macro_f1", "M-LFW-FER_accuracy", "M-LFW-FER-face-cut_accuracy"} <= set(metrics)
    confusion = _artifact(evaluate, "confusion")["metadata"]["confusionMatrix"]
    assert [s["displayName"] for s in confusion["annotationSpecs"]] == ["negative", "neutral", "positive"]
    assert sum(sum(r["row"]) for r in confusion["rows"]) == 15  # 5 eval images per class

    register = _outputs(run_root, "register")
    assert register["parameterValues"]["Output"] == "models:/ferflow-lfw-fer/1"
    assert _artifact(register, "registered")["metadata"]["mlflow_model_uri"] == "models:/ferflow-lfw-fer/1"
    (decision,) = json.loads(_outputs(run_root, "promote")["parameterValues"]["Output"])
    assert decision["action"] == "promoted" and decision["champion_after"] == "1"
    reports = _artifact(train, "reports")
    assert (Path(reports["uri"]) / DATASET / "report.json").is_file() and reports["metadata"]["manifest_sha256"]

    baseline = _outputs(run_root, "zero-shot")  # demo_tiny has no pretrained head: recorded, not failed
    assert (Path(_artifact(baseline, "evaluation")["uri"]) / "zero-shot" / "none" / f"{MODEL}.json").is_file()

    report = _outputs(run_root, "report")
    markdown = Path(_artifact(report, "results")["uri"]).read_text()
    assert f"| {DATASET} | {MODEL} |" in markdown
    table = Path(_artifact(report, "table")["uri"]).read_text()
    assert f"fine-tuned,{MODEL},{DATASET},M-LFW-FER," in table
