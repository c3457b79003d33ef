"""The served model, logged as an MLflow "model from code" (no pickled classes).

MLflow copies this file into the model and runs it at load time; `set_model` at the bottom
names the model object. Artifacts it reads (see `ferflow.tracking.packaging.log_model`):

    weights   best.safetensors of a training run (3-class head)
    run_json  run.json of that run: zoo model name, input size, class order
    onnx      model.onnx (ferflow.models.export): run on onnxruntime when the model_config
              says engine: onnx (serve.engine), with the preprocessing in its metadata

Input: a pandas DataFrame with a column `image` (base64 text or raw bytes of an encoded
image) or `path` (an image file; in-process only: a REST server refuses it unless
FERFLOW_SERVE_ALLOW_PATHS=1, so that clients cannot probe the server's files), one image
per row.
Output: a DataFrame with `label` and one `p_<class>` column per class.

Preprocessing and inference are ferflow's one path (ferflow.models.inference): the
preprocessing recorded in run.json (prepare's decode, crop and resize) and the Predictor
that evaluate and predict use, so served probabilities equal theirs.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

BATCH_SIZE = 32
# MLflow's scoring server sets this (mlflow/pyfunc/scoring_server/__init__.py, `init`).
SERVING_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"
ALLOW_PATHS_ENV = "FERFLOW_SERVE_ALLOW_PATHS"
MAX_REPORTED_ROWS = 5  # a bad batch names this many rows, then a count


class FerflowImageClassifier(PythonModel):
    """3-class facial-expression classifier of one ferflow training run."""

    def load_context(self, context) -> None:
        from ferflow.models import inference

        # serve.engine, from the MLmodel's model_config (load_model(model_config=...) overrides it).
        engine = (getattr(context, "model_config", None) or {}).get("engine", "torch")
        if engine == "onnx":
            from ferflow.models.export import OnnxPredictor

            if "onnx" not in context.artifacts:
                raise MlflowException("engine onnx, but the model was logged without model.onnx; re-register it")
            self.predictor = OnnxPredictor(context.artifacts["onnx"])  # same decode, same probabilities
        elif engine == "torch":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self.predictor = inference.load_files(context.artifacts["weights"], context.artifacts["run_json"], device)
        else:
            raise MlflowException(f"model_config engine {engine!r}: expected torch or onnx")
        self.classes, self.size = self.predictor.classes, self.predictor.preprocess.size
        self.detector = None
        if self.predictor.preprocess.face_crop.startswith("detect"):
            from ferflow.data.faces import FaceDetector, read_weights_container

            if "detector" not in context.artifacts:
                raise MlflowException("the model crops faces with a detector (face_crop "
                                      f"{self.predictor.preprocess.face_crop}) but was logged without its weights")
            self.detector = FaceDetector(read_weights_container(Path(context.artifacts["detector"])))

    # The DataFrame hint tells MLflow not to infer a signature from hints (the logged one rules).
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        images = self._decode_all(frame)
        probs = self._probabilities(images)
        labels = [self.classes[i] for i in probs.argmax(1)] if len(probs) else []
        # object dtype: pandas 3's string dtype is one MLServer's V2 codec cannot encode.
        return pd.DataFrame({"label": pd.Series(labels, dtype=object),
                             **{f"p_{c}": probs[:, i] for i, c in enumerate(self.classes)}})

    # ---------------------------------------------------------------------------- input

    def _decode_all(self, frame: pd.DataFrame) -> list[np.ndarray]:
        from ferflow.data.decode import decode_photo

        columns = [c for c in ("image", "path") if c in frame.columns]
        if not columns:
            raise MlflowException.invalid_parameter_value(
                f"input needs a column 'image' (base64 text or bytes of an image) or 'path' (an image file); "
                f"got columns {list(frame.columns)}"
            )
        allow_paths = os.environ.get(SERVING_ENV, "").lower() != "true" or os.environ.get(ALLOW_PATHS_ENV) == "1"
        arrays, problems = [], []
        for label, row in zip(frame.index, frame[columns].itertuples(index=False, name=None)):
            try:
                data = _row_bytes(dict(zip(columns, row)), allow_paths)
                arrays.append(decode_photo(data, self.predictor.preprocess, self.detector).arrays[self.size])
            except Exception as exc:  # noqa: BLE001 - every failure becomes "row N: why"
                problems.append(f"row {label}: {_reason(exc)}")
        if problems:
            shown = "; ".join(problems[:MAX_REPORTED_ROWS])
            more = f" (and {len(problems) - MAX_REPORTED_ROWS} more)" if len(problems) > MAX_REPORTED_ROWS else ""
            raise MlflowException.invalid_parameter_value(f"{len(problems)} of {len(frame)} rows unusable: {shown}{more}")
        return arrays

    def _probabilities(self, arrays: list[np.ndarray]) -> np.ndarray:
        return self.predictor.probabilities_of_arrays(arrays, BATCH_SIZE)


def _row_bytes(row: dict, allow_paths: bool) -> bytes:
    image, path = row.get("image"), row.get("path")
    if _present(image):
        if isinstance(image, (bytes, bytearray, memoryview)):
            return bytes(image)
        if isinstance(image, str):
            text = image.strip()
            if text.startswith("data:") and "," in text:  # a data URL from a browser
                text = text.split(",", 1)[1]
            try:
                return base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("'image' is not valid base64") from None
        raise ValueError(f"'image' must be base64 text or bytes, got {type(image).__name__}")
    if _present(path):
        if not allow_paths:
            raise ValueError(f"'path' inputs are off in a model server (set {ALLOW_PATHS_ENV}=1 to allow); "
                             "send the image bytes base64-encoded in 'image'")
        try:
            return Path(str(path)).read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read path {str(path)!r}: {exc.strerror or exc}") from None
    raise ValueError("neither 'image' nor 'path' is set")


def _present(value) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and np.isnan(value):
        return False
    return not (isinstance(value, str) and not value.strip())


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


mlflow.models.set_model(FerflowImageClassifier())
