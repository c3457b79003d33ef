"""Params sections for what follows training: evaluation (evaluate), the results report
(report), MLflow tracking (tracking), the model registry (registry) and serving (serve)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from ferflow.config.base import Frozen


class EvaluateSettings(Frozen):
    out_dir: Path = Path("evaluation")
    split: Literal["eval", "val", "train"] = "eval"
    batch_size: int = Field(default=64, ge=1)
    zero_shot: bool = True
    surprise: Literal["ignore", "negative", "neutral", "positive"] = "ignore"


class ReportSettings(Frozen):
    out_dir: Path = Path("reports")


class TrackingSettings(Frozen):
    """MLflow. MLFLOW_TRACKING_URI (and the standard MLflow auth variables) override the
    embedded default; credentials never belong here."""

    enabled: bool = True
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_location: str = Field(default="mlruns/artifacts", description="for experiments created on the embedded store")
    experiment: str = "ferflow"
    timeout_s: float = Field(default=10.0, gt=0, description="per MLflow HTTP request")
    max_retries: int = Field(default=2, ge=0, le=10)
    log_system_metrics: bool = True
    log_model: bool = Field(default=True, description="false: `register` refuses (a version is a logged model)")


class RegistrySettings(Frozen):
    """One registered model per dataset; promotion moves the `champion` alias by a gate."""

    names: dict[str, str] = Field(default_factory=dict, description="dataset -> registered model name")
    records_dir: Path = Field(default=Path("registry"), description="what register/promote did, as files (DVC outs)")
    metric: str = "eval_accuracy"
    min_delta: float = Field(default=0.0, ge=0)
    # Chance is 1/3 for 3 classes: with no champion to beat, a near-chance model would serve.
    first_champion_min: float = Field(
        default=0.40, ge=0, le=1,
        description="with no champion yet, the gate metric a first champion needs when it has no zero-shot start")
    promote_in_experiments: bool = Field(
        default=False, description="`dvc exp run` trials register (tagged dvc.experiment) but move champion only if true")

    def name_for(self, dataset: str) -> str:
        return self.names.get(dataset) or f"ferflow-{dataset.lower()}"


class ServeSettings(Frozen):
    """The registered model's runtime. Every version carries model.onnx either way; the
    engine is recorded in its MLmodel (model_config) and can be overridden when loading."""

    engine: Literal["torch", "onnx"] = Field(
        default="torch", description="torch: the weights on PyTorch; onnx: model.onnx on onnxruntime")
