"""KFP component: fine-tune one model on one dataset (`ferflow.stages.train`)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

from ferflow.pipeline import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(
    config: Input[Artifact],
    dataset: str,
    model_name: str,
    dvc_lock: dict,
    dvc_remote: str,
    gpus: int,
    model: Output[Model],
    reports: Output[Artifact],
    metrics: Output[Metrics],
):
    """Fetch and prepare only this dataset at this model's size, then train: in-process, or
    under torchrun with one process per GPU when `gpus` > 1. The run directory (weights,
    run.json, history, MLflow run id) becomes `model`, the prepare reports `reports`."""
    from pathlib import Path

    from ferflow import stages
    from ferflow.pipeline import artifacts, distributed, glue

    with glue.workspace(config.path, dvc_lock=dvc_lock, outputs={"models": model.path}) as params:
        stages.fetch(params, params.data.members(dataset), dvc_lock=dvc_lock, dvc_remote=dvc_remote)
        glue.prepare_at(params, [dataset], model_name)
        result = distributed.launch_train(params, Path(glue.PARAMS_FILE).resolve(), dataset, model_name, gpus)
        artifacts.publish_model(model, result.run_dir)
        artifacts.publish_reports(reports, params, [dataset])
    artifacts.log_metrics(metrics, result.best_metrics)
