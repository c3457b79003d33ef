"""KFP component: manifests, reports and image caches (`ferflow.stages.prepare`)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from ferflow.pipeline import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare(config: Input[Artifact], raw: Input[Dataset], prepared: Output[Dataset], reports: Output[Artifact]):
    """Prepare every archive: each model is evaluated on every dataset's eval split, so
    each training task gets all of them. `reports` holds only the report.json files."""
    from ferflow import stages
    from ferflow.pipeline import glue

    with glue.workspace(config.path, inputs={"raw": raw.path}, outputs={"prepared": prepared.path}) as params:
        results = stages.prepare(params)
        glue.publish_reports(prepared, reports, params, [r.dataset for r in results])
