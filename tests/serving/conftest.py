"""Shared by the serving tests: no MLflow state in or out of a test."""

import mlflow
import pytest

# Every variable that points MLflow somewhere or tunes it; cleared around each test.
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_HTTP_REQUEST_TIMEOUT",
              "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
              "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
              "MLFLOW_S3_ENDPOINT_URL", "FERFLOW_ARTIFACTS_DESTINATION")


@pytest.fixture(autouse=True)
def isolation(monkeypatch, tmp_path):
    """A registry download cache of each test's own; the MLflow client state reset after."""
    for key in MLFLOW_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("FERFLOW_CACHE", str(tmp_path / "cache"))
    yield
    from ferflow.tracking import service

    service.reset()
    mlflow.set_tracking_uri(None)
