"""`ferflow serve manifest` / `validate`: KServe InferenceService manifests for registered
versions, and `mlflow models serve` answering exactly what `ferflow predict` says.

Two real registries: a local sqlite store whose artifacts go straight to S3 (moto), so the
storageUri is the real s3:// folder MLflow wrote, and the session's `mlflow server` that
proxies its artifacts (mlflow-artifacts:), which KServe cannot read without
--artifacts-destination."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import start_on_free_port, stop_group, wait_ready
from ferflow import cli
from ferflow.config import load_params
from ferflow.errors import ConfigError
from ferflow.labels import CLASSES
from ferflow.serving import kserve
from ferflow.tracking import aliases, service, versioning
from tracking.test_serving import DATASET, face_jpeg, fabricated_run, post

from .conftest import MLFLOW_ENV

BIN = Path(sys.executable).parent
PROBS = [f"p_{c}" for c in CLASSES]
PORTRAIT = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
S3_BUCKET = "ferflow-kserve"
PROXY_DESTINATION = "s3://ferflow-mlflow/artifacts"  # tests/conftest.py's server --artifacts-destination


# ---------------------------------------------------------------------------- fixtures


def s3_variables(s3) -> dict:
    return {**s3.env(), "MLFLOW_S3_ENDPOINT_URL": s3.endpoint}


def write_params(params, path: Path, *overrides: str) -> Path:
    """A params file for the CLI: `params` with overrides applied."""
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    if overrides:
        path.write_text(yaml.safe_dump(load_params(path, list(overrides)).model_dump(mode="json")))
    return path


@pytest.fixture(scope="module")
def s3_store(tmp_path_factory, s3_server):
    """sqlite registry with S3 artifacts: version 1 = champion, version 2 = challenger.
    Returns (params file, registered model name)."""
    root = tmp_path_factory.mktemp("kserve-s3")
    s3_server.make_bucket(S3_BUCKET)
    with pytest.MonkeyPatch.context() as mp:
        for key in MLFLOW_ENV:
            mp.delenv(key, raising=False)
        for key, value in s3_variables(s3_server).items():
            mp.setenv(key, value)
        base, first = fabricated_run(root / "a", f"sqlite:///{root / 'mlflow.db'}")
        params_file = write_params(base, root / "params.yaml", f"tracking.artifact_location=s3://{S3_BUCKET}/artifacts")
        params = load_params(params_file)
        name = params.registry.name_for(DATASET)
        _, second = fabricated_run(root / "b", f"sqlite:///{root / 'mlflow.db'}")  # other random weights
        try:
            assert str(versioning.register(params, DATASET, first).version) == "1"
            assert aliases.promote(params, name).action == "promoted"
            assert str(versioning.register(params, DATASET, second).version) == "2"
        finally:
            service.reset()
    return params_file, name


@pytest.fixture(scope="module")
def proxied(tmp_path_factory, mlflow_server):
    """The session's tracking server (artifacts proxied to moto S3): one version, champion.
    Returns (params file, registered model name)."""
    root = tmp_path_factory.mktemp("kserve-proxied")
    with pytest.MonkeyPatch.context() as mp:
        for key in MLFLOW_ENV:
            mp.delenv(key, raising=False)
        params, run_dir = fabricated_run(root, mlflow_server.uri)
        name = params.registry.name_for(DATASET)
        try:
            versioning.register(params, DATASET, run_dir)
            assert aliases.promote(params, name).action == "promoted"
        finally:
            service.reset()
    return write_params(params, root / "params.yaml"), name


@pytest.fixture
def s3_vars(s3_server, monkeypatch):
    """This machine's S3 credentials (--check-storage reads the bucket with them)."""
    for key, value in s3_variables(s3_server).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


def ferflow(capsys, *args) -> tuple[int, str, str]:
    """The CLI in-process, as the console script runs it: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_.value.code or 0, captured.out, captured.err


def manifest(capsys, params_file, *args) -> tuple[int, dict, str]:
    """`ferflow serve manifest` to stdout: (exit code, the parsed YAML or {}, stderr)."""
    code, out, err = ferflow(capsys, "serve", "manifest", *args, "--params", params_file)
    return code, (yaml.safe_load(out) if code == 0 else {}), " ".join(err.split())


def s3_keys(s3, uri: str) -> set[str]:
    """Object names under an s3:// folder, relative to it."""
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])}


# ---------------------------------------------------------------------------- manifests


@pytest.mark.slow
def test_alias_is_pinned_to_its_version_at_a_real_s3_folder(s3_store, s3_vars, tmp_path, capsys):
    params_file, name = s3_store
    out = tmp_path / "isvc" / "champion.yaml"
    code, _, err = manifest(capsys, params_file, "--model", f"models:/{name}@champion", "--out", out,
                            "--check-storage")
    assert code == 0, err
    text = out.read_text()
    assert text.startswith("# KServe InferenceService for models:/") and "kubectl apply" in text
    doc = yaml.safe_load(text)

    assert doc["apiVersion"] == "serving.kserve.io/v1beta1" and doc["kind"] == "InferenceService"
    assert doc["metadata"]["name"] == name  # champion: the stable service name
    labels, notes = doc["metadata"]["labels"], doc["metadata"]["annotations"]
    assert labels["ferflow.io/model-version"] == "1" and labels["ferflow.io/model-alias"] == "champion"
    assert labels["ferflow.io/registered-model"] == name and labels["modelClass"] == "mlserver_mlflow.MLflowRuntime"
    assert notes["ferflow.io/model-ref"] == f"models:/{name}@champion"
    assert notes["ferflow.io/model-uri"] == f"models:/{name}/1"
    assert notes["ferflow.io/model-id"].startswith("m-") and len(notes["ferflow.io/weights-sha256"]) == 64

    model = doc["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "mlflow"} and model["protocolVersion"] == "v2"
    storage = model["storageUri"]
    assert storage.startswith(f"s3://{S3_BUCKET}/artifacts/") and storage.endswith("/artifacts/")
    keys = s3_keys(s3_vars, storage)  # the folder MLflow wrote: MLmodel and the weights it names
    assert {"MLmodel", "artifacts/best.safetensors", "artifacts/run.json", "artifacts/model.onnx"} <= keys
    mlmodel = yaml.safe_load(s3_vars.client().get_object(
        Bucket=S3_BUCKET, Key=storage[len(f"s3://{S3_BUCKET}/"):] + "MLmodel")["Body"].read())
    assert mlmodel["model_id"] == notes["ferflow.io/model-id"]

    assert model["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}
    env = {e["name"]: e["value"] for e in model["env"]}
    assert env == {"MLSERVER_MODEL_NAME": name, "MLSERVER_MODEL_URI": "/mnt/models",
                   "MLSERVER_MODEL_IMPLEMENTATION": "mlserver_mlflow.MLflowRuntime",
                   "_MLFLOW_IS_IN_SERVING_ENVIRONMENT": "true", "FERFLOW_CPUS": "2", "OMP_NUM_THREADS": "2"}
    predictor = doc["spec"]["predictor"]
    assert predictor["minReplicas"] == 1 and predictor["maxReplicas"] == 1
    assert not {"scaleMetric", "scaleTarget", "serviceAccountName"} & set(predictor)
    assert "namespace" not in doc["metadata"] and "runtime" not in model and "image" not in model
    assert kserve.validate(doc) == []
    assert "(checked)" in err and "note: no --image or --runtime" in err

    # The challenger is another version, in another folder, under another name.
    code, challenger, err = manifest(capsys, params_file, "--model", f"models:/{name}@challenger")
    assert code == 0, err
    assert challenger["metadata"]["name"] == f"{name}-challenger"
    assert challenger["metadata"]["annotations"]["ferflow.io/model-uri"] == f"models:/{name}/2"
    assert challenger["spec"]["predictor"]["model"]["storageUri"] != storage
    # A version number gives the same folder as the alias that points at it.
    code, numbered, err = manifest(capsys, params_file, "--model", f"models:/{name}/2")
    assert code == 0, err
    assert numbered["metadata"]["name"] == f"{name}-v2"
    assert "ferflow.io/model-alias" not in numbered["metadata"]["labels"]
    assert numbered["metadata"]["annotations"]["ferflow.io/model-aliases"] == "challenger"
    assert numbered["spec"]["predictor"]["model"]["storageUri"] == challenger["spec"]["predictor"]["model"]["storageUri"]


@pytest.mark.slow
def test_gpu_resources_replicas_and_placement_options(s3_store, capsys):
    params_file, name = s3_store
    code, doc, err = manifest(
        capsys, params_file, "--model", f"models:/{name}@champion", "--name", "fer-gpu", "--namespace", "ml-serving",
        "--gpus", 2, "--cpu", "3500m", "--memory", "12Gi", "--min-replicas", 0, "--max-replicas", 4,
        "--scale-metric", "concurrency", "--scale-target", 8, "--service-account", "ferflow-s3",
        "--runtime", "ferflow-mlserver", "--image", "ghcr.io/ferflow/ferflow-serve:1")
    assert code == 0, err
    assert doc["metadata"]["name"] == "fer-gpu" and doc["metadata"]["namespace"] == "ml-serving"
    predictor = doc["spec"]["predictor"]
    assert predictor["minReplicas"] == 0 and predictor["maxReplicas"] == 4
    assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] == 8
    assert predictor["serviceAccountName"] == "ferflow-s3"
    model = predictor["model"]
    assert model["runtime"] == "ferflow-mlserver" and model["image"] == "ghcr.io/ferflow/ferflow-serve:1"
    assert model["resources"]["requests"] == {"cpu": "3500m", "memory": "12Gi"}
    assert model["resources"]["limits"] == {"cpu": "3500m", "memory": "12Gi", "nvidia.com/gpu": "2"}
    env = {e["name"]: e["value"] for e in model["env"]}
    assert env["OMP_NUM_THREADS"] == "3" and env["MLSERVER_MODEL_NAME"] == "fer-gpu"  # whole cores of 3.5
    assert "scales to zero only in Knative" in err and "no --image" not in err

    code, doc, err = manifest(capsys, params_file, "--model", f"models:/{name}@champion", "--gpus", 1,
                              "--gpu-resource", "amd.com/gpu", "--artifacts-destination", "s3://elsewhere")
    assert code == 0, err
    assert "--artifacts-destination unused: the artifacts are not proxied" in err
    assert doc["spec"]["predictor"]["model"]["resources"]["limits"]["amd.com/gpu"] == "1"


@pytest.mark.slow
def test_explicit_storage_uri_replaces_the_registry_location(s3_store, capsys):
    params_file, name = s3_store
    code, doc, err = manifest(capsys, params_file, "--model", f"models:/{name}/1", "--image", "ferflow-serve:1",
                              "--storage-uri", "pvc://models-claim/ferflow/lfw-fer/v1/")
    assert code == 0, err
    assert "--image without --runtime keeps kserve-mlserver's container" in err
    assert doc["spec"]["predictor"]["model"]["storageUri"] == "pvc://models-claim/ferflow/lfw-fer/v1/"
    assert doc["metadata"]["annotations"]["ferflow.io/model-location"].startswith(f"s3://{S3_BUCKET}/")


@pytest.mark.slow
@pytest.mark.parametrize("args, says", [
    (["--model", "ferflow-lfw-fer"], "expected models:/<name>@<alias> or models:/<name>/<version>"),
    (["--model", "models:/{name}@production"], "has no alias 'production' at sqlite:"),
    (["--model", "models:/{name}@production"], "aliases: challenger (v2), champion (v1)"),
    (["--model", "models:/no-such-model@champion"], "no registered model named 'no-such-model'"),
    (["--model", "models:/{name}/99"], "has no version 99"),
    (["--model", "models:/{name}@champion", "--name", "FER_Service"], "--name 'FER_Service': expected lower-case"),
    (["--model", "models:/{name}@champion", "--name", "9lives"], "starting with a letter"),
    (["--model", "models:/{name}@champion", "--name", "a" * 64], "64 characters, more than 63"),
    (["--model", "models:/{name}@champion", "--memory", "4"], "--memory '4': is 4 bytes, too little to load a model "
                                                              "(did you mean 4Gi?)"),
    (["--model", "models:/{name}@champion", "--cpu", "two"], "--cpu 'two': 'two' is not a Kubernetes quantity"),
    (["--model", "models:/{name}@champion", "--cpu", "0"], "--cpu '0': must be positive"),
    (["--model", "models:/{name}@champion", "--min-replicas", 3, "--max-replicas", 2],
     "--max-replicas 2: expected at least 1 and at least --min-replicas (3)"),
    (["--model", "models:/{name}@champion", "--gpus", -1], "--gpus -1: expected 0 or more"),
    (["--model", "models:/{name}@champion", "--gpus", 1, "--gpu-resource", "gpu"], "--gpu-resource 'gpu'"),
    (["--model", "models:/{name}@champion", "--scale-metric", "gpu"], "--scale-metric 'gpu': expected one of cpu"),
    (["--model", "models:/{name}@champion", "--storage-uri", "s3://bucket/model"], "must end in '/'"),
    (["--model", "models:/{name}@champion", "--storage-uri", "file:///srv/models/x/"],
     "reads s3://, gs://, pvc://, https:// here; not file"),
    (["--model", "models:/{name}@champion", "--storage-uri", "s3://key:secret@bucket/model/"], "holds credentials"),
    (["--model", "models:/{name}@champion", "--storage-uri", "s3://b/m/", "--artifacts-destination", "s3://b"],
     "give --storage-uri or --artifacts-destination, not both"),
    (["--model", "models:/{name}@champion", "--service-account", "S3 Reader"], "serviceAccountName 'S3 Reader'"),
])
def test_bad_references_and_options_exit_2(s3_store, capsys, args, says):
    params_file, name = s3_store
    code, _, err = manifest(capsys, params_file, *[a.format(name=name) if isinstance(a, str) else a for a in args])
    assert code == 2, err
    assert says in err, err
    assert "Traceback" not in err


def test_unreachable_registry_exits_1(tmp_path, capsys, refused_port):
    port = refused_port
    params_file = tmp_path / "params.yaml"
    shutil.copy(Path(__file__).resolve().parents[2] / "params.yaml", params_file)
    code, _, err = manifest(capsys, params_file, "--model", "models:/ferflow-lfw-fer@champion",
                            "--set", f"tracking.tracking_uri=http://127.0.0.1:{port}")
    assert code == 1, err
    assert f"127.0.0.1:{port} is not reachable" in err


@pytest.mark.slow
def test_proxied_artifacts_need_the_servers_destination(proxied, s3_vars, capsys):
    params_file, name = proxied
    ref = f"models:/{name}@champion"
    code, _, err = manifest(capsys, params_file, "--model", ref)
    assert code == 2, err
    assert "proxied by the MLflow tracking server" in err and "--artifacts-destination" in err

    code, doc, err = manifest(capsys, params_file, "--model", ref, "--artifacts-destination", PROXY_DESTINATION + "/",
                              "--check-storage")
    assert code == 0, err
    storage = doc["spec"]["predictor"]["model"]["storageUri"]
    location = doc["metadata"]["annotations"]["ferflow.io/model-location"]
    assert location.startswith("mlflow-artifacts:") and storage.endswith("/")
    assert storage == PROXY_DESTINATION + "/" + location.split(":", 1)[1].lstrip("/").rstrip("/") + "/"
    assert "MLmodel" in s3_keys(s3_vars, storage)

    # A wrong destination is caught by --check-storage (nothing there), not by KServe later.
    code, _, err = manifest(capsys, params_file, "--model", ref, "--artifacts-destination", "s3://ferflow-mlflow/x",
                            "--check-storage")
    assert code == 1, err
    assert "--check-storage: cannot read s3://ferflow-mlflow/x/" in err


def test_storage_locations_kserve_can_and_cannot_read():
    assert kserve.storage_uri_for("s3://b/1/models/m-1/artifacts") == "s3://b/1/models/m-1/artifacts/"
    assert kserve.storage_uri_for("gs://b/m/") == "gs://b/m/"
    assert kserve.storage_uri_for("mlflow-artifacts://mlflow:5000/2/models/m-9/artifacts", "s3://art/mlflow/") == \
        "s3://art/mlflow/2/models/m-9/artifacts/"
    assert kserve.storage_uri_for("wasbs://models@acct.blob.core.windows.net/1/m/artifacts") == \
        "https://acct.blob.core.windows.net/models/1/m/artifacts/"
    for location, says in [("file:///home/me/mlruns/1/m/artifacts", "--storage-uri pvc://"),
                           ("/home/me/mlruns/1/m/artifacts", "this machine's disk"),
                           ("dbfs:/databricks/mlflow/1/m", "does not read dbfs: URIs"),
                           ("mlflow-artifacts:/1/models/m-1/artifacts", "cannot read mlflow-artifacts: URIs")]:
        with pytest.raises(ConfigError) as exc:
            kserve.storage_uri_for(location)
        assert says in str(exc.value)


def test_default_names_and_labels_from_odd_registry_names():
    def version(name, alias=None, number="3"):
        return kserve.RegisteredVersion(name=name, version=number, alias=alias, aliases=(), model_id="m-1",
                                        location="s3://bucket/m/")

    assert kserve.default_name(version("FER Model_v2", "champion")) == "fer-model-v2"
    assert kserve.default_name(version("2024-fer", "Staging_A")) == "m-2024-fer-staging-a"
    assert kserve.default_name(version("fer")) == "fer-v3"
    long = kserve.default_name(version("x" * 80, "challenger"))
    assert len(long) == kserve.NAME_ROOM and long.endswith("-challenger")
    doc = kserve.build(version("FER Model_v2", "_tmp"), kserve.ServeOptions(), "s3://bucket/m/")
    labels, notes = doc["metadata"]["labels"], doc["metadata"]["annotations"]
    assert "ferflow.io/registered-model" not in labels and "ferflow.io/model-alias" not in labels
    assert notes["ferflow.io/registered-model"] == "FER Model_v2" and notes["ferflow.io/model-alias"] == "_tmp"
    assert kserve.validate(doc) == []


# ---------------------------------------------------------------------------- validate


def valid_doc() -> dict:
    return {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": {"name": "ferflow-lfw-fer", "labels": {"ferflow.io/model-version": "3"},
                     "annotations": {"ferflow.io/model-uri": "models:/ferflow-lfw-fer/3"}},
        "spec": {"predictor": {"minReplicas": 1, "maxReplicas": 2, "model": {
            "modelFormat": {"name": "mlflow"}, "protocolVersion": "v2",
            "storageUri": "s3://models/1/models/m-abc/artifacts/",
            "resources": {"requests": {"cpu": "500m", "memory": "2Gi"},
                          "limits": {"cpu": 1, "memory": "2Gi", "nvidia.com/gpu": 1}}}}},
    }


def broken(path: str, value) -> dict:
    """valid_doc() with the dotted `path` set to `value` (None deletes it)."""
    doc = valid_doc()
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return doc


@pytest.mark.parametrize("path, value, says", [
    ("apiVersion", "serving.kserve.io/v1alpha1", "apiVersion: expected serving.kserve.io/v1beta1"),
    ("kind", "Deployment", "kind: expected InferenceService"),
    ("metadata.name", "Ferflow", "metadata.name 'Ferflow'"),
    ("metadata.name", None, "metadata.name None: must be a non-empty string"),
    ("metadata.namespace", "ML_team", "metadata.namespace 'ML_team'"),
    ("metadata.labels", {"ferflow.io/model-version": 3}, "values must be strings"),
    ("metadata.labels", {"ferflow.io/model": "models:/x/3"}, "at most 63 letters"),
    ("metadata.annotations", {"bad key!": "x"}, "metadata.annotations key 'bad key!'"),
    ("spec.predictor", None, "spec.predictor: required"),
    ("spec.predictor.model", None, "spec.predictor.model: required"),
    ("spec.predictor.model.modelFormat", {"name": ""}, "modelFormat.name: required"),
    ("spec.predictor.model.protocolVersion", "v1", "MLflow models are served over v2"),
    ("spec.predictor.model.storageUri", None, "storageUri None: required"),
    ("spec.predictor.model.storageUri", "s3://models/1/models/m-abc/artifacts", "must end in '/'"),
    ("spec.predictor.model.storageUri", "mlflow-artifacts:/1/models/m-abc/artifacts/", "tracking server's proxy"),
    ("spec.predictor.model.storageUri", "models:/ferflow-lfw-fer@champion", "not models"),
    ("spec.predictor.model.storageUri", "s3:///models/", "expected s3://<bucket>/<path>/"),
    ("spec.predictor.model.storageUri", "pvc://Claim_1/m/", "PVC name 'Claim_1'"),
    ("spec.predictor.model.storageUri", "s3://models/", "names a whole bucket"),
    ("spec.predictor.model.storageUri", "https://acct.blob.core.windows.net/c/m/?sig=abc", "query"),
    ("spec.predictor.model.resources", {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}, "requests.cpu is above"),
    ("spec.predictor.model.resources", {"limits": {"memory": "4 Gi"}}, "limits.memory '4 Gi'"),
    ("spec.predictor.model.resources", {"limits": {"nvidia.com/gpu": "0.5"}}, "whole units"),
    ("spec.predictor.model.resources", {"requests": {"nvidia.com/gpu": 1}}, "need a limit"),
    ("spec.predictor.model.resources", {"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 2}},
     "requests must equal limits"),
    ("spec.predictor.maxReplicas", 0.5, "maxReplicas 0.5: expected an integer"),
    ("spec.predictor.minReplicas", 3, "maxReplicas 2 is below minReplicas 3"),
    ("spec.predictor.scaleMetric", "gpu", "scaleMetric 'gpu'"),
    ("spec.predictor.scaleTarget", 0, "scaleTarget 0: expected a positive integer"),
    ("spec.predictor.model.env", [{"name": "A B", "value": "1"}], "model.env"),
    ("spec.predictor.model.env", [{"name": "MLSERVER_MODEL_NAME", "value": "old-name"}],
     "/v2/models/ferflow-lfw-fer/infer and get 404"),
    ("spec.predictor.model.image", "ferflow serve", "image 'ferflow serve'"),
])
def test_validate_names_what_kserve_would_refuse(path, value, says):
    with pytest.raises(kserve.ManifestError) as exc:
        kserve.validate(broken(path, value))
    assert says in str(exc.value), str(exc.value)
    assert exc.value.exit_code == 2


def test_validate_accepts_a_good_document_and_quantities():
    assert kserve.validate(valid_doc()) == []
    notes = kserve.validate(broken("metadata.name", "f" * 50))
    assert any("predictor-00001 exceeds 63" in n for n in notes)
    assert kserve.parse_quantity("500m") == kserve.parse_quantity("0.5")
    assert kserve.parse_quantity("1Gi") == 2**30 and kserve.parse_quantity("1G") == 10**9
    assert kserve.parse_quantity("2e3") == 2000 and kserve.parse_quantity("1E") == 10**18
    assert kserve.parse_quantity(8) == 8
    for bad in ("1 Gi", "Gi", "1gi", "-", "1.2.3", True):
        with pytest.raises(ValueError):
            kserve.parse_quantity(bad)


def test_validate_command_checks_files(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3creds"}}
    good.write_text(yaml.safe_dump_all([secret, valid_doc()]))
    code, _, err = ferflow(capsys, "serve", "validate", good)
    assert code == 0 and "1 InferenceService(s) valid" in err

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(broken("spec.predictor.model.storageUri", "s3://models/m")))
    code, _, err = ferflow(capsys, "serve", "validate", good, bad)
    assert code == 2 and "bad.yaml (document 1)" in err and "must end in '/'" in " ".join(err.split())

    (tmp_path / "none.yaml").write_text(yaml.safe_dump(secret))
    code, _, err = ferflow(capsys, "serve", "validate", tmp_path / "none.yaml")
    assert code == 2 and "no InferenceService" in err


# ---------------------------------------------------------------------------- served == predicted


def photos(folder: Path) -> list[Path]:
    """Photos of different kinds: JPEG portrait, synthetic JPEG face, RGBA PNG, grey, wide."""
    folder.mkdir(parents=True)
    shutil.copy(PORTRAIT, folder / "portrait.jpg")
    (folder / "face.jpg").write_bytes(face_jpeg())
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 256, (90, 70, 4), dtype=np.uint8), "RGBA").save(folder / "alpha.png")
    Image.open(PORTRAIT).convert("L").save(folder / "grey.jpg", quality=80)
    Image.open(PORTRAIT).resize((300, 120)).save(folder / "wide.png")
    return sorted(folder.iterdir())


@pytest.mark.slow
def test_mlflow_models_serve_answers_what_ferflow_predict_says(proxied, tmp_path, capsys):
    params_file, name = proxied
    files = photos(tmp_path / "photos")
    code, _, err = ferflow(capsys, "predict", *files, "--model", f"models:/{name}@champion",
                           "--out", tmp_path / "predicted.json", "--params", params_file)
    assert code == 0, err
    rows = {Path(r["path"]).name: r for r in json.loads((tmp_path / "predicted.json").read_text())["predictions"]}
    assert sorted(rows) == [f.name for f in files]

    uri = load_params(params_file).tracking.tracking_uri
    # Proxied artifacts: the server needs no AWS variables; venv first on PATH for uvicorn.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update({"MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"})
    log = tmp_path / "serve.log"

    def start(port: int) -> subprocess.Popen:
        with open(log, "wb") as fh:
            return subprocess.Popen(
                [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local",
                 "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)

    # Started again on another port if the picked one is taken before uvicorn binds it.
    port, proc = start_on_free_port(start, lambda port, proc: wait_ready(f"http://127.0.0.1:{port}/ping", proc, log),
                                    log, stop=stop_group)
    try:
        base = f"http://127.0.0.1:{port}"
        images = [base64.b64encode(f.read_bytes()).decode("ascii") for f in files]
        status, split = post(f"{base}/invocations", {"dataframe_split": {"columns": ["image"],
                                                                         "data": [[i] for i in images]}})
        assert status == 200, split
        status, records = post(f"{base}/invocations", {"dataframe_records": [{"image": i} for i in images]})
        assert status == 200, records
    finally:
        stop_group(proc)

    predicted = np.array([[rows[f.name][p] for p in PROBS] for f in files])
    assert np.ptp(predicted, axis=0).max() > 1e-4, predicted  # different photos, different answers
    for body in (split, records):
        served = body["predictions"]
        assert [r["label"] for r in served] == [rows[f.name]["label"] for f in files]
        assert np.abs(np.array([[r[p] for p in PROBS] for r in served]) - predicted).max() <= 1e-6
