"""MLflow: the one place that configures it (service), lineage tags, training/evaluation runs,
and the model registry. Everything here imports mlflow lazily or is imported only when
`tracking.enabled` is true, so training and evaluation run without MLflow at all."""
