"""The compiled YAML: cluster settings that kfp.local ignores (GPU, resources, tolerations,
node selector, /dev/shm, secrets as env, caching, retries, timeouts, image), parameter
defaults from the checkout, no secret value anywhere, and the committed file up to date."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from ferflow.config import read_yaml
from ferflow.pipeline import IMAGE_ENV, IMAGE_REPOSITORY, configured_image, image_tag
from ferflow.pipeline.glue import matrix
from ferflow.pipeline.spec import DEFAULT_OUT, CompileOptions, PipelineDefaults, compile_pipeline, load_compiled

from . import REPO

# Distinctive values in the compiling process's environment: none may reach the YAML.
SECRET_VALUES = {
    "MLFLOW_TRACKING_URI": "https://mlflow-user:pw-in-uri-7Q2@mlflow.example",
    "MLFLOW_TRACKING_USERNAME": "mlflow-user-X9QZ",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-pass-P4SSW0RD-81",
    "MLFLOW_TRACKING_TOKEN": "mlflow-token-T0K3N-27",
    "AWS_ACCESS_KEY_ID": "AKIAFERFLOWTESTKEY77",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-S3CR3T-do-not-log",
    "KFP_EXISTING_TOKEN": "kfp-token-K7P-55",
}
OPTIONS = CompileOptions(
    image="registry.example/ferflow:test-7", gpus=2, train_cpu_request="6", train_cpu_limit="12",
    train_memory_request="24Gi", train_memory_limit="48Gi", shm_size="16Gi",
    node_selector=(("nvidia.com/gpu.product", "NVIDIA-A100-SXM4-80GB"),),
    mlflow_secret="mlflow-creds", s3_secret="s3-creds", fetch_retries=5, train_timeout_s=7200,
    task_cpu_request="3", task_memory_request="6Gi", gpu_quota=6, work_storage_class="fast-local",
)
EXECUTORS = ("exec-fetch", "exec-train", "exec-evaluate", "exec-zero-shot", "exec-register", "exec-promote",
             "exec-report")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        for key, value in SECRET_VALUES.items():
            mp.setenv(key, value)
        out = compile_pipeline(tmp_path_factory.mktemp("compile") / "ferflow.yaml", OPTIONS, repo=REPO)
    spec, platform = load_compiled(out)
    return out.read_text(), spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _tasks(spec: dict) -> dict:
    """Every task of the pipeline by name, loops included."""
    found, stack = {}, [spec["root"]["dag"]]
    while stack:
        for name, task in stack.pop()["tasks"].items():
            found[name] = task
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" in component:
                stack.append(component["dag"])
    return found


def test_training_tasks_get_gpus_and_resources(compiled):
    _, spec, _ = compiled
    resources = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert resources["accelerator"]["resourceCount"] == "2"
    assert (resources["resourceCpuRequest"], resources["resourceCpuLimit"]) == ("6", "12")
    assert (resources["resourceMemoryRequest"], resources["resourceMemoryLimit"]) == ("24Gi", "48Gi")
    for other in EXECUTORS[2:] + EXECUTORS[:1]:
        assert "accelerator" not in spec["deploymentSpec"]["executors"][other]["container"].get("resources", {})


def test_every_task_requests_cpu_memory_and_disk(compiled):
    """Requests on every task, the decode processes from the CPU request, and a work volume
    sized from the archives' sizes and image counts (sizing.disk_request)."""
    from ferflow.config import load_params
    from ferflow.pipeline import sizing

    _, spec, k8s = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert set(executors) == set(EXECUTORS)
    params = load_params(REPO / "params.yaml")
    for name in EXECUTORS:
        container = executors[name]["container"]
        resources = container["resources"]
        for key in ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"):
            assert resources.get(key), (name, key)
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert env["FERFLOW_CPUS"] == resources["resourceCpuRequest"], name
        (volume,) = k8s[name]["genericEphemeralVolume"]
        assert volume["mountPath"] == env["FERFLOW_WORK_DIR"] and volume["storageClassName"] == "fast-local"
        assert volume["size"] == sizing.disk_request(params, name[len("exec-"):]), name
    assert executors["exec-evaluate"]["container"]["resources"]["resourceCpuRequest"] == "3"
    # The real archives: a B2 (260 px) training on one archive needs its 10,487 images decoded (2.1 GB)
    # beside the zip; an evaluation decodes every archive.
    train_gi, evaluate_gi = (int(sizing.disk_request(params, k)[:-2]) for k in ("train", "evaluate"))
    assert 3 <= train_gi <= 5 and 8 <= evaluate_gi <= 11


def test_kubernetes_settings_of_training(compiled):
    _, _, k8s = compiled
    train = k8s["exec-train"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in train["tolerations"]
    assert train["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "16Gi"} in train[
        "emptyDirMounts"]
    assert int(train["activeDeadlineSeconds"]) == 7200
    assert all(int(k8s[e]["activeDeadlineSeconds"]) > 0 for e in k8s)  # every task has a timeout
    assert "tolerations" not in k8s["exec-evaluate"] and "emptyDirMounts" not in k8s["exec-zero-shot"]


def _secret_env(executor: dict) -> dict:
    """secret name -> {env var: optional}."""
    found = {}
    for entry in executor.get("secretAsEnv", []):
        for pair in entry["keyToEnv"]:
            assert pair["secretKey"] == pair["envVar"]
            found.setdefault(entry["secretName"], {})[pair["envVar"]] = entry.get("optional", False)
    return found


def test_secrets_as_env_on_the_tasks_that_need_them(compiled):
    _, _, k8s = compiled
    mlflow = {"MLFLOW_TRACKING_URI": False, "MLFLOW_TRACKING_USERNAME": True, "MLFLOW_TRACKING_PASSWORD": True,
              "MLFLOW_TRACKING_TOKEN": True}
    s3 = {"AWS_ACCESS_KEY_ID": True, "AWS_SECRET_ACCESS_KEY": True, "AWS_ENDPOINT_URL": True}
    expected = {
        "exec-fetch": {"s3-creds": s3},
        "exec-zero-shot": {"s3-creds": s3},
        "exec-train": {"mlflow-creds": mlflow, "s3-creds": s3},
        "exec-evaluate": {"mlflow-creds": mlflow, "s3-creds": s3},
        "exec-register": {"mlflow-creds": mlflow, "s3-creds": s3},
        "exec-promote": {"mlflow-creds": mlflow},
        "exec-report": {},
    }
    assert {name: _secret_env(k8s[name]) for name in expected} == expected


RUN_UNIQUE = ("pipeline_job_uuid", "pipeline_job_name", "pipeline_job_create_time", "pipeline_job_schedule_time",
              "pipeline_task_uuid", "pipeline_task_name")


def test_caching_retries_and_the_run_id(compiled):
    """Cached tasks take no run-unique value; the run id reaches MLflow from the pod label
    (Downward API) and as an input of the uncached register task only."""
    _, spec, k8s = compiled
    tasks = _tasks(spec)
    for name in ("register", "promote"):
        assert tasks[name]["cachingOptions"] == {}, name  # enableCache absent: false
    for name in ("fetch", "train", "evaluate", "zero-shot", "report"):
        assert tasks[name]["cachingOptions"]["enableCache"] is True, name
        assert not any(key in json.dumps(tasks[name]["inputs"]) for key in RUN_UNIQUE), name
    retry = tasks["fetch"]["retryPolicy"]
    assert retry["maxRetryCount"] == 5 and retry["backoffDuration"] == "60s" and retry["backoffFactor"] == 2.0
    run_id = tasks["register"]["inputs"]["parameters"]["run_id"]["runtimeValue"]["constant"]
    assert run_id == "{{$.pipeline_job_uuid}}"  # dsl.PIPELINE_JOB_ID_PLACEHOLDER
    for name in ("exec-train", "exec-evaluate"):
        assert {"name": "KFP_RUN_ID", "fieldPath": "metadata.labels['pipeline/runid']"} in k8s[name]["fieldPathAsEnv"]
    assert tasks["promote"]["inputs"]["artifacts"]["registered"]["taskOutputArtifact"]["producerTask"].startswith(
        "for-loop")  # after every registration, gathered
    loops = {t["parameterIterator"]["items"]["inputParameter"]: t for t in tasks.values() if "parameterIterator" in t}
    assert set(loops) == {"pipelinechannel--matrix", "pipelinechannel--models"}
    # --gpu-quota 6 with --gpus 2: three trainings at a time.
    assert loops["pipelinechannel--matrix"]["iteratorPolicy"]["parallelismLimit"] == 3


def test_compiling_twice_gives_the_same_cache_keys(tmp_path):
    """Other processes (hash seeds) compile the same spec: cache keys do not drift."""
    texts = []
    for seed in ("1", "2"):
        out = tmp_path / f"p{seed}.yaml"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, str(REPO / "pipelines" / "ferflow_pipeline.py"), str(out)], env=env,
                       check=True, capture_output=True, cwd=REPO)
        texts.append(out.read_text())
    assert texts[0] == texts[1]


def test_every_task_runs_the_configured_image(compiled):
    _, spec, _ = compiled
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters["image"]["defaultValue"] == "registry.example/ferflow:test-7"
    for label, executor in spec["deploymentSpec"]["executors"].items():
        assert executor["container"]["image"] == "{{$.inputs.parameters['pipelinechannel--image']}}", label
        assert "pip install" not in json.dumps(executor["container"]["command"]), label  # kfp comes with the image


def test_parameters_default_to_the_checkout(compiled):
    _, spec, _ = compiled
    parameters = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    params = read_yaml(REPO / "params.yaml")
    assert json.loads(parameters["base_params"]) == params
    assert parameters["datasets"] == params["train"]["datasets"] and parameters["models"] == params["train"]["models"]
    assert parameters["matrix"] == matrix(params["train"]["datasets"], params["train"]["models"])
    assert parameters["experiment"] == params["tracking"]["experiment"]
    assert parameters["registered_models"] == params["registry"]["names"]
    assert set(parameters["archives"]) == set(params["data"]["archives"]) and parameters["overrides"] == []


def test_no_secret_value_in_the_yaml(compiled):
    text, _, _ = compiled
    for name, value in SECRET_VALUES.items():
        assert value not in text, name
    assert "pw-in-uri" not in text and "mlflow-user" not in text


def test_image_option_and_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(IMAGE_ENV, raising=False)
    assert configured_image() == f"{IMAGE_REPOSITORY}:{image_tag(REPO)}" == CompileOptions().image
    monkeypatch.setenv(IMAGE_ENV, "registry.example/ferflow:from-env")
    assert CompileOptions().image == "registry.example/ferflow:from-env"
    out = compile_pipeline(tmp_path / "p.yaml", CompileOptions(gpus=0, mlflow_secret="", s3_secret=""), repo=REPO)
    spec, platform = load_compiled(out)
    image = spec["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"]
    assert image == "registry.example/ferflow:from-env"
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert not any("secretAsEnv" in e or "tolerations" in e for e in executors.values())


def test_committed_yaml_is_what_the_checkout_compiles(tmp_path):
    """pipelines/ferflow.yaml must be regenerated (`ferflow pipeline compile`) whenever
    params.yaml, dvc.lock, .dvc/config, the components, the pipeline or the image's inputs
    change: its default image is the one `make image` builds from this checkout."""
    env = {k: v for k, v in os.environ.items() if k != IMAGE_ENV}
    out = tmp_path / "fresh.yaml"
    subprocess.run([sys.executable, str(REPO / "pipelines/ferflow_pipeline.py"), str(out)], check=True, env=env,
                   cwd=tmp_path, capture_output=True, timeout=120)
    committed = REPO / DEFAULT_OUT
    assert committed.is_file(), "pipelines/ferflow.yaml is missing: run `ferflow pipeline compile`"
    assert out.read_text() == committed.read_text(), "pipelines/ferflow.yaml is stale: run `ferflow pipeline compile`"
    assert len(list(yaml.safe_load_all(committed.read_text()))) == 2  # parses (KFP's header comment included)
    assert PipelineDefaults.from_checkout(REPO).dvc_remote in committed.read_text()
    assert f"{IMAGE_REPOSITORY}:{image_tag(REPO)}" in committed.read_text()
