"""KFP component: one trained model on every dataset's eval split (`ferflow.stages.evaluate`)."""

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from ferflow.pipeline import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    config: Input[Artifact],
    dataset: str,
    model_name: str,
    run_id: str,
    prepared: Input[Dataset],
    model: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
):
    """Evaluation files into `evaluation` (logged to the training's MLflow run too), the
    cross-dataset accuracies into `metrics`, the in-domain confusion matrix into `confusion`."""
    from ferflow import stages
    from ferflow.pipeline import glue

    with glue.workspace(config.path, run_id=run_id, inputs={"prepared": prepared.path, "models": model.path},
                        outputs={"evaluation": evaluation.path}) as params:
        summary = stages.evaluate(params, dataset, model_name)
        glue.log_evaluation(metrics, confusion, params, dataset, model_name, summary)
