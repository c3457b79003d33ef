"""The logged model: a run directory's model as an MLflow pyfunc "model from code".

What goes into it: pyfunc_model.py (MODEL_CODE) run at load time, a copy of the ferflow
package as its code path, the weights and a redacted run.json (plus the face detector's
weights for detector-cropped runs), model.onnx (`ferflow.models.export`, checked against
torch before anything is logged), the signature and an input example, and requirements
pinned to this environment. The tags below (on logged models and on the versions made from
them) name the weights and the ONNX file; `serve.engine` picks the runtime at load time.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator, Optional

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ColSpec, Schema

from ferflow import layout
from ferflow.fileio import sha256_file
from ferflow.errors import FerflowError
from ferflow.redact import redact_tree
from ferflow.tracking.rundir import read_run_dir, recorded_run_id

log = logging.getLogger(__name__)

# MLflow copies this file into every logged model; it must stay beside this module.
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
LOGGED_MODEL_NAME = "model"
WEIGHTS_TAG = "model.weights_sha256"  # sha256 of best.safetensors, on logged models and versions
# model.onnx (ferflow.models.export) rides in every logged model as the artifact `onnx`, at
# ONNX_PATH inside the model; these tags (on logged models and versions) name it, and
# ENGINE_TAG the runtime recorded in the MLmodel's model_config (serve.engine).
ONNX_PATH = "artifacts/model.onnx"
ONNX_PATH_TAG, ONNX_SHA_TAG, ONNX_OPSET_TAG = "model.onnx.path", "model.onnx.sha256", "model.onnx.opset"
ENGINE_TAG = "serve.engine"
MODEL_TAGS = (ENGINE_TAG, ONNX_PATH_TAG, ONNX_SHA_TAG, ONNX_OPSET_TAG)  # copied onto the version

# What the served model imports (the bundled ferflow code included), pinned to this
# environment so `mlflow models serve --env-manager virtualenv` rebuilds the same one.
REQUIREMENTS = ("torch", "torchvision", "timm", "safetensors", "pillow", "numpy", "pandas", "mlflow",
                "pydantic", "pyyaml", "requests", "onnxruntime")


def log_model(run_dir: Path, run_id: Optional[str] = None, engine: str = "torch") -> ModelInfo:
    """Log the run directory's model (pyfunc from code, safetensors weights) into a run.

    The run: `run_id`, else the one recorded in `<run_dir>/mlflow_run.json`, else the
    active run, else a new run in MLflow's current experiment. A model already logged
    there from the same weights is reused, so retries do not pile up copies.
    Uses the current tracking URI (`service.configure` sets it). `engine` (serve.engine):
    what `mlflow.pyfunc.load_model` runs, torch or onnxruntime on the logged model.onnx.
    """
    run_dir = Path(run_dir)
    info = read_run_dir(run_dir)
    run_id = run_id or recorded_run_id(run_dir)
    if run_id is None:
        active = mlflow.active_run()
        if active is not None:
            run_id = active.info.run_id
        else:
            with mlflow.start_run(run_name=f"{info.get('dataset', 'model')}/{info['model']}") as run:
                mlflow.set_tags({"ferflow.registered_from_run_dir": "true", "ferflow.run_dir": str(run_dir.resolve())})
            run_id = run.info.run_id
    return log_into_run(MlflowClient(), run_dir, info, run_id, engine)


def log_into_run(client: MlflowClient, run_dir: Path, info: dict, run_id: str, engine: str = "torch") -> ModelInfo:
    """Log the model of `run_dir` (its run.json: `info`) into run `run_id`, or return the
    model an earlier try logged there from the same weights and engine."""
    weights_sha256 = sha256_file(run_dir / layout.WEIGHTS)
    existing = _find_logged_model(client, run_id, weights_sha256, engine)
    if existing is not None:
        log.info("run %s already holds model %s with these weights; reusing it", run_id, existing.model_id)
        return mlflow.models.get_model_info(f"models:/{existing.model_id}")
    experiment_id = client.get_run(run_id).info.experiment_id
    tags = {WEIGHTS_TAG: weights_sha256, "model.name": str(info["model"]),
            "dataset.name": str(info.get("dataset", "")), "recipe.hash": str(info.get("recipe_hash", ""))}
    with _bundled_code() as code, tempfile.TemporaryDirectory(prefix="ferflow-onnx-") as tmp:
        # Exported (and checked against torch) before anything is created: a model that
        # cannot export fails registration here, with nothing half-logged.
        onnx = _export_onnx(run_dir, weights_sha256, run_id, Path(tmp) / Path(ONNX_PATH).name)
        tags.update({ENGINE_TAG: engine, ONNX_PATH_TAG: ONNX_PATH, ONNX_SHA_TAG: onnx.sha256,
                     ONNX_OPSET_TAG: str(onnx.opset)})
        # Created here, in the run's experiment: left to MLflow, a model logged outside an
        # active run lands in the process's current experiment instead.
        logged = client.create_logged_model(experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run_id, tags=tags)
        return Model.log(
            artifact_path=None, name=LOGGED_MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id, model_id=logged.model_id,
            python_model=str(MODEL_CODE),
            artifacts={**_model_artifacts(run_dir, info, Path(tmp)), "onnx": str(onnx.path)},
            code_paths=[code], signature=_signature(), input_example=_input_example(),
            pip_requirements=_requirements(), model_config={"engine": engine},
        )


def _find_logged_model(client: MlflowClient, run_id: str, weights_sha256: str, engine: str = "torch"):
    """A model already logged into the run from these weights and engine, with its ONNX (by an earlier try)."""
    run = client.get_run(run_id)
    for output in run.outputs.model_outputs if run.outputs is not None else []:
        try:
            model = client.get_logged_model(output.model_id)
        except MlflowException:
            continue
        if (model.tags.get(WEIGHTS_TAG) == weights_sha256 and str(model.status).upper().endswith("READY")
                and model.tags.get(ONNX_SHA_TAG) and model.tags.get(ENGINE_TAG, "torch") == engine):
            return model
    return None


def _export_onnx(run_dir: Path, weights_sha256: str, run_id: str, out: Path):
    """model.onnx of the run's model (ferflow.models.export), on CPU."""
    import torch

    from ferflow.models.inference import load_run
    from ferflow.models.export import export_onnx

    try:
        return export_onnx(load_run(run_dir, torch.device("cpu")), out, source=f"runs:/{run_id}",
                           weights_sha256=weights_sha256)
    except FerflowError as exc:
        raise FerflowError(f"{run_dir}: not registered, every version carries its model.onnx: {exc}") from exc


def _model_artifacts(run_dir: Path, info: dict, staging: Path) -> dict[str, str]:
    """Weights and run.json; the face detector's weights too when the run was trained on
    detector crops, so the served model crops its inputs the same way.

    run.json is logged as a redacted copy: a run directory written by an older ferflow may
    still hold archive or weights URIs with credentials in them."""
    run_json = staging / layout.RUN_JSON
    run_json.write_text(json.dumps(redact_tree(info), indent=2), encoding="utf-8")
    artifacts = {"weights": str(run_dir / layout.WEIGHTS), "run_json": str(run_json)}
    if str((info.get("preprocess") or {}).get("face_crop", "none")).startswith("detect"):
        from ferflow.config import validate
        from ferflow.data.faces import detector_weights

        params = validate(info["params"], origin=str(run_dir / layout.RUN_JSON))
        artifacts["detector"] = str(detector_weights(params.prepare.detector, params.fetch))
    return artifacts


def _signature() -> ModelSignature:
    from ferflow.labels import CLASSES

    # `path` is optional beside `image` so that in-process callers can pass files.
    inputs = Schema([ColSpec("string", "image", required=False), ColSpec("string", "path", required=False)])
    outputs = Schema([ColSpec("string", "label")] + [ColSpec("double", f"p_{c}") for c in CLASSES])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _input_example() -> pd.DataFrame:
    """One 8x8 grey PNG: small, and MLflow checks serving with it while logging."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode("ascii")]})


def _requirements() -> list[str]:
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


@contextmanager
def _bundled_code() -> Iterator[str]:
    """A copy of the ferflow package without caches: the model serves the code it was
    logged with, not whatever ferflow is installed where it is loaded."""
    import ferflow

    with tempfile.TemporaryDirectory(prefix="ferflow-code-") as tmp:
        dest = Path(tmp) / "ferflow"
        shutil.copytree(Path(ferflow.__file__).parent, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        yield str(dest)
