"""More than one GPU: the train stage under real torchrun (2 CPU ranks, gloo) against the
single-process run, torchrun failures, and the Kubeflow Trainer TrainJob for several nodes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

from ferflow import stages
from ferflow.config import dump_params, load_params
from ferflow.errors import ConfigError, FerflowError
from ferflow.pipeline import S3_KEYS, distributed, trainjob
from ferflow.training.trainer import TrainResult

REPO = Path(__file__).resolve().parents[2]

# Tiny but real: 32 px demo faces, demo_tiny, one head epoch and one full epoch.
TRAIN = [
    "train.models=[demo_tiny]", "train.datasets=[LFW-FER]", "train.input_size=32",
    "train.head_stage.epochs=1", "train.head_stage.lr=0.01", "train.full_stage.epochs=1", "train.full_stage.lr=0.002",
    "train.workers=0", "train.threads=1", "train.early_stopping_patience=0", "tracking.enabled=false",
    # No augmentation: its random draws come from each rank's own seed (seed + rank), so
    # with it the two runs would differ by design rather than by arithmetic.
    "train.augment.hflip=false", "train.augment.rotate_deg=0", "train.augment.translate=0",
    "train.augment.scale=[1.0,1.0]",
]


@pytest.fixture(scope="module")
def tiny_workspace(tmp_path_factory):
    """Demo archives (150 faces per class, 32 px), LFW-FER fetched and prepared, and a
    random-init demo_tiny stored as "pretrained" weights; returns (params file, weights)."""
    ws = tmp_path_factory.mktemp("ddp-ws")
    base = load_params(REPO / "params.yaml", [
        f"demo.out_dir={ws / 'archives'}", "demo.images_per_class=150", "demo.image_size=32",
        f"data.raw_dir={ws / 'data/raw'}", f"data.prepared_dir={ws / 'data/prepared'}",
        "prepare.image_sizes=[32]", "prepare.workers=1", "fetch.progress=false", "demo.overrides=[]",
    ])
    params_file = ws / "params.yaml"
    stages.demo_data(base, params_out=params_file)
    params = load_params(params_file)
    stages.fetch(params, ["LFW-FER"])
    stages.prepare(params, ["LFW-FER"])
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3, global_pool="avg")
    weights = ws / "demo_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return params_file, weights


def write_params(path: Path, base: Path, *overrides):
    """Resolved params in their own folder: the ranks read the file, relative paths from there."""
    params = load_params(base, list(overrides))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dump_params(params), sort_keys=False))
    return params, path


def test_two_ranks_under_torchrun_equal_one_process_at_the_same_global_batch(tiny_workspace, tmp_path, monkeypatch):
    """2 ranks x batch 16 against 1 process x batch 32, both from the same "pretrained"
    weights. Pretrained models train with frozen BatchNorm (the real recipe), so no layer
    depends on how a batch is split; each step then averages the same 32 per-image
    gradients, summed in another order. Measured: weights within 3e-6 after the two epochs
    (18 steps), the same val accuracy, val loss equal to 5 digits. The bounds leave ~30x
    room for float reordering; a real defect (ranks on the same shard, no gradient
    all-reduce, lr or batch semantics changed) moves weights by 1e-2 and more. Each rank
    also reports a digest of its final weights (FERFLOW_PARAMS_DIGEST_DIR): DDP keeps the
    ranks bit-identical, so unequal digests mean the gradients were not synchronised."""
    base, weights = tiny_workspace
    common = [*TRAIN, f"models.demo_tiny.pretrained={weights}"]
    one, one_file = write_params(tmp_path / "one/params.yaml", base, *common, "train.batch_size=32",
                                 f"train.out_dir={tmp_path / 'one/models'}")  # in-process: never the cwd's
    two, two_file = write_params(tmp_path / "two/params.yaml", base, *common, "train.batch_size=16",
                                 "train.out_dir=models")  # relative: read from the params file's folder

    single = distributed.launch_train(one, one_file, "LFW-FER", "demo_tiny", nproc=1)
    digests = tmp_path / "digests"
    monkeypatch.setenv("FERFLOW_PARAMS_DIGEST_DIR", str(digests))  # after the in-process run: ranks only
    ddp = distributed.launch_train(two, two_file, "LFW-FER", "demo_tiny", nproc=2)
    ranks = [json.loads((digests / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert ranks[0]["sha256"] == ranks[1]["sha256"], "the ranks ended with different weights: no gradient sync"

    assert isinstance(ddp, TrainResult)
    # What the files give back is what trainer.train returned in-process.
    assert distributed.read_result(single.run_dir) == single
    assert distributed.resume_epoch(one, "LFW-FER", "demo_tiny", single.run_dir) == 2  # last.pt, same recipe
    assert distributed.resume_epoch(two, "LFW-FER", "demo_tiny", single.run_dir) == 0  # another recipe
    assert ddp.run_dir == tmp_path / "two/models/LFW-FER/demo_tiny"
    info = json.loads((ddp.run_dir / "run.json").read_text())
    assert info["world_size"] == 2 and single.run_dir.joinpath("run.json").is_file()
    assert (ddp.best_epoch, ddp.epochs_run, ddp.resumed_from_epoch) == (single.best_epoch, single.epochs_run, 0)
    assert [h["stage"] for h in ddp.history] == [h["stage"] for h in single.history] == ["head", "full"]
    assert set(ddp.best_metrics) == set(single.best_metrics)
    n_val = ddp.best_metrics["val_n"]
    assert n_val == single.best_metrics["val_n"] == info["n_val"]  # every val image once over both ranks
    assert abs(ddp.best_metrics["val_accuracy"] - single.best_metrics["val_accuracy"]) <= 1 / n_val
    assert ddp.best_metrics["val_loss"] == pytest.approx(single.best_metrics["val_loss"], rel=1e-4)
    for a, b in zip(single.history, ddp.history):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
    w1, w2 = load_file(single.run_dir / "best.safetensors"), load_file(ddp.run_dir / "best.safetensors")
    assert w1.keys() == w2.keys()
    diff = max(float((w1[k].double() - w2[k].double()).abs().max()) for k in w1)
    moved = max(float((w1[k].double() - v.double()).abs().max()) for k, v in load_file(weights).items()
                if k in w1 and "classifier" not in k)
    assert diff < 1e-4 < moved, (diff, moved)  # equal, and not because nothing trained


def test_a_failing_torchrun_raises_naming_the_command(tiny_workspace, tmp_path):
    params, params_file = write_params(tmp_path / "params.yaml", tiny_workspace[0], *TRAIN)
    with pytest.raises(FerflowError) as caught:
        distributed.launch_train(params, params_file, "LFW-FER", "no_such_model", nproc=2)
    message = str(caught.value)
    assert "torch.distributed.run" in message and "--nproc_per_node=2" in message and "no_such_model" in message
    assert "exited with code 1" in message
    assert "unknown model 'no_such_model'" in message  # the ranks' own error, from the output tail


def test_output_is_streamed_and_a_failure_quotes_its_tail(tmp_path, capsys):
    script = "import sys; print('step 1'); print('boom', file=sys.stderr); sys.exit(3)"
    with pytest.raises(FerflowError) as caught:
        distributed.run_streamed([sys.executable, "-c", script], cwd=tmp_path, env=dict(os.environ))
    assert "exited with code 3" in str(caught.value) and "step 1\nboom" in str(caught.value)
    assert "step 1\nboom\n" in capsys.readouterr().err  # copied to the task log as it came


def test_params_that_differ_from_the_file_are_refused(tiny_workspace, tmp_path):
    params, params_file = write_params(tmp_path / "params.yaml", tiny_workspace[0], *TRAIN)
    other = load_params(params_file, ["train.batch_size=7"])
    with pytest.raises(FerflowError, match="differ from"):
        distributed.launch_train(other, params_file, "LFW-FER", "demo_tiny", nproc=2)


def test_torchrun_command_and_rank_environment(monkeypatch):
    cmd = distributed.torchrun_command(Path("/w/params.yaml"), "LFW-FER", "demo_tiny", 4)
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                   "-m", "ferflow.cli", "train", "--dataset", "LFW-FER", "--model", "demo_tiny",
                   "--params", "/w/params.yaml"]
    monkeypatch.setattr(distributed, "_cpu_count", lambda: 16)
    assert distributed.child_env(4, {})["OMP_NUM_THREADS"] == "4"
    assert distributed.child_env(32, {})["OMP_NUM_THREADS"] == "1"
    assert distributed.child_env(4, {"OMP_NUM_THREADS": "2"})["OMP_NUM_THREADS"] == "2"  # set: kept


# ---------------------------------------------------------------------------- TrainJob

SECRET_VALUES = {"MLFLOW_TRACKING_PASSWORD": "pw-must-not-leak", "AWS_SECRET_ACCESS_KEY": "key-must-not-leak"}


@pytest.fixture
def repo_params():
    return load_params(REPO / "params.yaml")


def build(params, **changes):
    options = dict(image="registry.example/ferflow:0.1.0", dataset="LFW-FER", model="enet_b0_7", num_nodes=3,
                   gpus_per_node=4, cpu="16", memory="64Gi")
    options.update(changes)
    return trainjob.trainjob_documents(params, **options)


def test_trainjob_validates_with_the_sdk_and_says_what_it_should(repo_params, monkeypatch):
    from kubeflow_trainer_api import models as k8s

    for key, value in SECRET_VALUES.items():
        monkeypatch.setenv(key, value)
    configmap, job = build(repo_params)
    assert k8s.TrainerV1alpha1TrainJob.from_dict(job).to_dict() == job  # the SDK reads back what we wrote
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    spec, trainer = job["spec"], job["spec"]["trainer"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                  "name": "torch-distributed"}
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (3, 4)
    for side in ("requests", "limits"):
        assert trainer["resourcesPerNode"][side] == {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "4"}
    assert trainer["image"] == "registry.example/ferflow:0.1.0"
    assert trainer["command"] == ["bash", "-c"]
    script = trainer["args"][0]
    assert "ferflow fetch --params /etc/ferflow/params.yaml --dataset LFW-FER" in script
    assert script.splitlines()[-1] == ("exec python -m torch.distributed.run -m ferflow.cli train --dataset LFW-FER "
                                       "--model enet_b0_7 --params /etc/ferflow/params.yaml")
    assert "--standalone" not in script and "--nnodes" not in script  # rendezvous from the runtime's PET_*
    env = {e["name"]: e for e in trainer["env"]}
    refs = {name: e["valueFrom"]["secretKeyRef"] for name, e in env.items() if "valueFrom" in e}
    assert refs["MLFLOW_TRACKING_URI"] == {"name": "ferflow-mlflow", "key": "MLFLOW_TRACKING_URI", "optional": False}
    assert refs["MLFLOW_TRACKING_PASSWORD"]["name"] == "ferflow-mlflow" and refs["MLFLOW_TRACKING_PASSWORD"]["optional"]
    assert {refs[k]["name"] for k in S3_KEYS} == {"ferflow-s3"}
    assert all("value" not in env[name] for name in refs)
    assert env["OMP_NUM_THREADS"]["value"] == "4" and env["FERFLOW_CPUS"]["value"] == "16"  # 16 CPUs / 4 ranks
    text = trainjob.dump_documents([configmap, job])
    assert not any(value in text for value in SECRET_VALUES.values())
    # The params ConfigMap, mounted where the script reads it.
    assert configmap["kind"] == "ConfigMap" and configmap["metadata"]["name"] == "ferflow-lfw-fer-enet-b0-7-params"
    assert yaml.safe_load(configmap["data"]["params.yaml"]) == dump_params(repo_params)
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["name"] == "node"
    pod = pod["template"]["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/etc/ferflow"]["name"] == volume["name"] and mounts["/etc/ferflow"]["readOnly"]
    assert "/dev/shm" in mounts


def test_cpu_nodes_and_no_secrets(repo_params):
    _, job = build(repo_params, gpus_per_node=0, mlflow_secret="", s3_secret="", name="cpu-run", namespace="ml")
    trainer = job["spec"]["trainer"]
    assert trainer["numProcPerNode"] == 1 and "nvidia.com/gpu" not in trainer["resourcesPerNode"]["limits"]
    assert not any("valueFrom" in e for e in trainer["env"])
    assert job["metadata"]["name"] == "cpu-run" and job["metadata"]["namespace"] == "ml"


@pytest.mark.parametrize("change, message", [
    ({"num_nodes": 0}, "number of nodes 0"),
    ({"image": ""}, "image ''"),
    ({"image": "has space"}, "image 'has space'"),
    ({"gpus_per_node": -1}, "GPUs per node -1"),
    ({"cpu": "lots"}, "CPU per node 'lots'"),
    ({"memory": "0"}, "memory per node '0'"),
    ({"name": "Bad_Name"}, "TrainJob name 'Bad_Name'"),
    ({"mlflow_secret": "not a name"}, "MLflow secret 'not a name'"),
    ({"dataset": "nope"}, "no dataset named 'nope'"),
])
def test_bad_trainjob_values_raise_a_clear_error(repo_params, change, message):
    with pytest.raises(FerflowError) as caught:
        build(repo_params, **change)
    assert message in str(caught.value)


def test_the_sdk_models_reject_what_our_checks_let_through(repo_params):
    # A resource name is not one of our checks; the SDK's ResourceRequirements types it.
    with pytest.raises(ConfigError, match="TrainJob"):
        build(repo_params, accelerator=None)


def ferflow(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "ferflow.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "FERFLOW_IMAGE": "registry.example/ferflow:dev"})


def test_cli_writes_a_trainjob_that_loads_back(tmp_path):
    out = tmp_path / "job/trainjob.yaml"
    done = ferflow("pipeline", "trainjob", "--dataset", "LFW-FER", "--model", "enet_b0_7", "--nodes", "2",
                   "--gpus-per-node", "4", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"kubectl apply -f {out}" in done.stdout + done.stderr
    configmap, job = yaml.safe_load_all(out.read_text())
    assert (configmap["kind"], job["kind"]) == ("ConfigMap", "TrainJob")
    assert job["spec"]["trainer"]["numNodes"] == 2 and job["spec"]["trainer"]["image"] == "registry.example/ferflow:dev"

    piped = ferflow("pipeline", "trainjob", "-d", "LFW-FER", "-m", "enet_b0_7", "--image", "img:1")
    assert piped.returncode == 0, piped.stderr
    assert [d["kind"] for d in yaml.safe_load_all(piped.stdout)] == ["ConfigMap", "TrainJob"]  # stdout: YAML only
    assert "kubectl apply -f -" in piped.stderr


def test_cli_refuses_a_bad_params_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text((REPO / "params.yaml").read_text() + "\ntrian: {}\n")
    done = ferflow("pipeline", "trainjob", "-d", "LFW-FER", "-m", "enet_b0_7", "--params", str(bad))
    assert done.returncode == 2
    assert "trian" in done.stderr and "unknown key" in done.stderr and "Traceback" not in done.stderr


def test_the_train_component_with_two_gpus_runs_two_ranks(tiny_workspace, tmp_path):
    """The KFP train component itself (as its executor calls it), `gpus=2` on this CPU:
    fetch and prepare in its workspace, then torchrun with 2 gloo ranks; the same result as
    `gpus=1` at the same global batch, and the run dir published as its Model artifact."""
    from kfp import dsl

    sys.path.insert(0, str(REPO))
    from components.train import train

    base, weights = tiny_workspace
    common = [*TRAIN, f"models.demo_tiny.pretrained={weights}"]
    results = {}
    for gpus, batch in ((1, 32), (2, 16)):
        _, config = write_params(tmp_path / f"config{gpus}/params.yaml", base, *common, f"train.batch_size={batch}")
        outputs = {name: dsl.Artifact(name=name, uri=str(tmp_path / f"out{gpus}" / name))
                   for name in ("model", "reports", "metrics")}
        outputs["metrics"] = dsl.Metrics(name="metrics", uri=str(tmp_path / f"out{gpus}" / "metrics"))
        train.python_func(config=dsl.Artifact(name="config", uri=str(config)), dataset="LFW-FER",
                          model_name="demo_tiny", dvc_lock={}, dvc_remote="", gpus=gpus, **outputs)
        run_dir = Path(outputs["model"].path) / "LFW-FER" / "demo_tiny"
        results[gpus] = (json.loads((run_dir / "run.json").read_text()), load_file(run_dir / "best.safetensors"),
                         outputs["metrics"].metadata)
        assert (Path(outputs["reports"].path) / "LFW-FER" / "report.json").is_file()
    (info1, w1, m1), (info2, w2, m2) = results[1], results[2]
    assert (info1["world_size"], info2["world_size"]) == (1, 2)
    assert max(float((w1[k].double() - w2[k].double()).abs().max()) for k in w1) < 1e-4
    assert m2["val_loss"] == pytest.approx(m1["val_loss"], rel=1e-4)
