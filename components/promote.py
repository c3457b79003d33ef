"""KFP component: move each dataset's `champion` by the evaluation gate (`ferflow.stages.promote`)."""

from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Input, Model

from ferflow.pipeline import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(config: Input[Artifact], registered: Input[List[Model]]) -> str:
    """Once per dataset, after all of the run's registrations (`registered`, gathered):
    promote the best challenger of its registered model if it beats the champion. Returns
    the decisions (promoted, refused or skipped, and why) as a JSON list."""
    from ferflow import stages
    from ferflow.pipeline import artifacts, glue

    with glue.workspace(config.path) as params:
        # `registered` orders this task after every registration; the loop covered all datasets.
        decisions = [stages.promote(params, dataset) for dataset in params.require_train().datasets]
    return artifacts.describe_decisions(decisions)
