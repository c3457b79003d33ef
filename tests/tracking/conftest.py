"""Tracking tests reuse the training tests' prepared demo workspace and keep MLflow's
process-wide state (tracking URI, env knobs, active experiment) from leaking between tests."""

import os

import pytest

from training.conftest import TRAIN_OVERRIDES, demo_workspace  # noqa: F401 - fixture re-export

MLFLOW_ENV = (
    "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_EXPERIMENT_NAME", "FERFLOW_PARENT_RUN_ID",
)


@pytest.fixture(autouse=True)
def mlflow_isolation():
    saved = {k: os.environ.get(k) for k in MLFLOW_ENV}
    yield
    from ferflow.tracking import service

    service.reset()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
