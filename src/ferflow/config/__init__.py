"""params.yaml as frozen pydantic models: a bad file or override fails before any work.

Every stage (CLI, DVC, KFP) reads its configuration through `load_params`, so there is a
single source of truth and a single place where keys are validated. The sections live in
data, train and results, the root model in params, reading and overrides in loading;
callers import them from here.
"""

from ferflow.config.base import SEED_MAX
from ferflow.config.data import (FACE_CROP_SYNTAX, ArchiveSource, ArchiveSpec, DataSettings, DemoSettings,
                                 DetectorSettings, FetchSettings, PrepareSettings, SplitSettings, check_face_crop,
                                 is_local_uri, uri_scheme)
from ferflow.config.loading import (DEFAULT_PARAMS, apply_override, describe_validation_error, dump_params,
                                    load_params, parse_override, read_yaml, validate)
from ferflow.config.params import Params
from ferflow.config.results import (EvaluateSettings, RegistrySettings, ReportSettings, ServeSettings,
                                    TrackingSettings)
from ferflow.config.train import (AugmentSettings, EmaSettings, LossSettings, ModelWeights, OptimizerSettings,
                                  StageSettings, TrainSettings)

__all__ = [
    "DEFAULT_PARAMS", "FACE_CROP_SYNTAX", "SEED_MAX",
    "ArchiveSource", "ArchiveSpec", "DataSettings", "FetchSettings", "SplitSettings", "DetectorSettings",
    "PrepareSettings", "DemoSettings",
    "ModelWeights", "StageSettings", "AugmentSettings", "OptimizerSettings", "LossSettings", "EmaSettings",
    "TrainSettings",
    "EvaluateSettings", "ReportSettings", "TrackingSettings", "RegistrySettings", "ServeSettings",
    "Params",
    "check_face_crop", "is_local_uri", "uri_scheme",
    "parse_override", "apply_override", "read_yaml", "validate", "load_params",
    "describe_validation_error", "dump_params",
]
