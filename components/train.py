"""KFP component: fine-tune one model on one dataset (`ferflow.stages.train`)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from ferflow.pipeline import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(
    config: Input[Artifact],
    dataset: str,
    model_name: str,
    run_id: str,
    dvc_lock: dict,
    prepared: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """The run directory (weights, run.json, history, MLflow run id) becomes `model`;
    the best validation metrics become `metrics`."""
    from ferflow import stages
    from ferflow.pipeline import glue

    with glue.workspace(config.path, run_id=run_id, dvc_lock=dvc_lock, inputs={"prepared": prepared.path},
                        outputs={"models": model.path}) as params:
        result = stages.train(params, dataset, model_name)
        glue.publish_model(model, result.run_dir)
    glue.log_metrics(metrics, result.best_metrics)
