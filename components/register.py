"""KFP component: a new MLflow model version, alias challenger (`ferflow.stages.register`)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from ferflow.pipeline import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(
    config: Input[Artifact],
    dataset: str,
    model_name: str,
    run_id: str,
    dvc_lock: dict,
    reports: Input[Artifact],
    model: Input[Model],
    evaluation: Input[Artifact],
    registered: Output[Model],
) -> str:
    """Register the trained model with its evaluation and lineage; returns and records
    (in `registered`'s metadata) the version's `models:/<name>/<version>` URI. Never cached,
    so the run id (an input here only) tags every version with the run that registered it."""
    from ferflow import stages
    from ferflow.pipeline import artifacts, glue

    inputs = {"prepared": reports.path, "models": model.path, "evaluation": evaluation.path}
    with glue.workspace(config.path, run_id=run_id, dvc_lock=dvc_lock, inputs=inputs) as params:
        version = stages.register(params, dataset, model_name)
        artifacts.publish_registered(registered, glue.run_dir(params, dataset, model_name), version)
    return registered.metadata["mlflow_model_uri"]
