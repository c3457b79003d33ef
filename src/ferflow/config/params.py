"""The whole params file: every section, and the checks that span sections."""

from __future__ import annotations

from typing import Optional

from pydantic import model_validator

from ferflow.config.base import Frozen, seed_field
from ferflow.config.data import DataSettings, DemoSettings, FetchSettings, PrepareSettings
from ferflow.config.results import (EvaluateSettings, RegistrySettings, ReportSettings, ServeSettings,
                                    TrackingSettings)
from ferflow.config.train import ModelWeights, TrainSettings
from ferflow.errors import ConfigError


class Params(Frozen):
    seed: int = seed_field(42)
    data: DataSettings
    fetch: FetchSettings = FetchSettings()
    prepare: PrepareSettings = PrepareSettings()
    demo: DemoSettings = DemoSettings()
    models: dict[str, ModelWeights] = {}
    train: Optional[TrainSettings] = None
    evaluate: EvaluateSettings = EvaluateSettings()
    report: ReportSettings = ReportSettings()
    tracking: TrackingSettings = TrackingSettings()
    registry: RegistrySettings = RegistrySettings()
    serve: ServeSettings = ServeSettings()

    @model_validator(mode="after")
    def _train_names_known(self) -> "Params":
        if self.train is not None:
            unknown = [d for d in self.train.datasets if d not in self.data.datasets]
            if unknown:
                raise ValueError(f"train.datasets names {unknown} not in data.archives or data.unions "
                                 f"({', '.join(self.data.datasets)})")
        return self

    def weights_for(self, model: str) -> ModelWeights:
        return self.models.get(model, ModelWeights())

    def require_train(self) -> TrainSettings:
        if self.train is None:
            raise ConfigError("params have no `train` section; see params.yaml in the repository")
        return self.train
