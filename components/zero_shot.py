"""KFP component: a pretrained head mapped to 3 classes, before fine-tuning (`ferflow.stages.zero_shot`)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from ferflow.pipeline import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def zero_shot(config: Input[Artifact], model_name: str, raw: Input[Dataset], evaluation: Output[Artifact],
              metrics: Output[Metrics]):
    """The report's "before fine-tuning" row of one model: every archive's eval split at the
    model's size, into `evaluation` (evaluate.out_dir/zero-shot layout) and `metrics`."""
    from ferflow import stages
    from ferflow.evaluation.evaluate import eval_datasets_for
    from ferflow.pipeline import artifacts, glue

    with glue.workspace(config.path, inputs={"raw": raw.path}, outputs={"evaluation": evaluation.path}) as params:
        glue.prepare_at(params, eval_datasets_for(params), model_name)
        summary = stages.zero_shot(params, model_name)
    artifacts.log_cross_dataset(metrics, summary)
