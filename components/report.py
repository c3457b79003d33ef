"""KFP component: the models x datasets results table (`ferflow.stages.report`)."""

from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Output

from ferflow.pipeline import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def report(
    config: Input[Artifact],
    evaluations: Input[List[Artifact]],
    zero_shots: Input[List[Artifact]],
    results: Output[Markdown],
    table: Output[Dataset],
):
    """Every evaluation of the run and the zero-shot rows, gathered: the Markdown table
    (shown in the KFP UI) and the long CSV."""
    from ferflow import stages
    from ferflow.pipeline import artifacts, glue

    with glue.workspace(config.path, inputs={"evaluation": [e.path for e in [*zero_shots, *evaluations]]}) as params:
        _results, paths = stages.report(params)
        artifacts.publish_report(results, table, paths)
