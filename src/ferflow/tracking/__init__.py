"""MLflow: the one place that configures it (service), lineage tags, training/evaluation runs,
and the model registry. Everything here imports mlflow lazily or is imported only when
`tracking.enabled` is true, so training and evaluation run without MLflow at all."""

import os as _os

# ferflow never needs the internet at run time: keep MLflow's telemetry thread from trying
# (offline it also raced with our reads of os.environ). A user's explicit setting wins.
_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
