"""KFP component: resolve the run's params and fetch the archives (`ferflow.stages.fetch`)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Output

from ferflow.pipeline import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def fetch(
    base_params: str,
    archives: dict,
    datasets: list,
    models: list,
    matrix: list,
    overrides: list,
    experiment: str,
    registered_models: dict,
    dvc_lock: dict,
    dvc_remote: str,
    config: Output[Artifact],
    raw: Output[Dataset],
):
    """Resolve the params every later task uses (the `config` artifact) and fetch every
    archive into `raw` with the CLI's fetch: archives pinned in dvc.lock come from the DVC
    remote by md5 and are held to the pin. Cached: the inputs pin each archive by sha256,
    so a verified download is the same content."""
    from ferflow import stages
    from ferflow.pipeline import artifacts, glue

    resolved = glue.resolve_config(
        base_params, archives=archives, datasets=datasets, models=models, pairs=matrix,
        experiment=experiment, registered_models=registered_models, overrides=overrides,
    )
    glue.publish_config(config, resolved)
    with glue.workspace(config.path, dvc_lock=dvc_lock, outputs={"raw": raw.path}) as params:
        artifacts.describe_raw(raw, stages.fetch(params, dvc_lock=dvc_lock, dvc_remote=dvc_remote))
