"""KFP component: one trained model on every dataset's eval split (`ferflow.stages.evaluate`)."""

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from ferflow.pipeline import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    config: Input[Artifact],
    dataset: str,
    model_name: str,
    raw: Input[Dataset],
    model: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    gallery: Output[Markdown],
):
    """Prepare the eval datasets at the model's size from the fetched archives, evaluate:
    files into `evaluation` (logged to the training's MLflow run too), the cross-dataset
    accuracies into `metrics`, the in-domain confusion matrix into `confusion`, and into
    `gallery` (Markdown) that matrix and the most confident mistakes as pictures."""
    from ferflow import stages
    from ferflow.evaluation.evaluate import eval_datasets_for
    from ferflow.pipeline import artifacts, glue

    with glue.workspace(config.path, inputs={"raw": raw.path, "models": model.path},
                        outputs={"evaluation": evaluation.path}) as params:
        glue.prepare_at(params, eval_datasets_for(params, dataset), model_name)
        summary = stages.evaluate(params, dataset, model_name)
        artifacts.log_evaluation(metrics, confusion, params, dataset, model_name, summary)
        artifacts.publish_gallery(gallery, params, dataset, model_name, summary)
