"""KFP component: move `champion` by the evaluation gate (`ferflow.stages.promote`)."""

from kfp import dsl
from kfp.dsl import Artifact, Input

from ferflow.pipeline import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(config: Input[Artifact], dataset: str) -> str:
    """Promote the best challenger of the dataset's registered model if it beats the
    champion; returns the decision (promoted or refused, and why) as JSON."""
    import json

    from ferflow import stages
    from ferflow.pipeline import glue

    with glue.workspace(config.path) as params:
        decision = stages.promote(params, dataset)
    print(f"{decision.name}: {decision.action}: {decision.reason}")
    return json.dumps(decision.as_dict())
