"""The ferflow pipeline for Kubeflow Pipelines (KFP v2).

    fetch -> prepare -> for each (dataset, model) in `matrix`:
                            train -> evaluate -> register -> promote
          -> report (every evaluation, gathered with dsl.Collected)

Every component calls the same `ferflow.stages` function as the CLI and dvc.yaml. The
parameters mirror params.yaml (base params, archives, datasets, models, experiment,
registered model names, `key=value` overrides); `matrix` is datasets x models, flattened
because kfp.local iterates only over pipeline parameters and mishandles nested loops.
prepare runs once for all archives: every model is evaluated on every dataset, and KFP 2.17
cannot pass a dsl.Collected fan-in into a ParallelFor (compiler TypeError).

Cluster settings (GPU, tolerations, node selector, /dev/shm, secrets as env, retries,
caching, timeouts) sit next to the task they apply to; kfp.local ignores them and the
compiled YAML carries them (kfp-kubernetes ones in its second document).

The KFP run id reaches MLflow through the tasks' `run_id` input, set to
dsl.PIPELINE_JOB_ID_PLACEHOLDER (the components export it as KFP_RUN_ID): KFP resolves
placeholders in task inputs (backend >= 2.4 and kfp.local), while an env value from
set_env_variable is passed verbatim (checked with kfp.local). The `image` parameter
(set_container_image) also needs a KFP backend >= 2.4.

Compile: `ferflow pipeline compile` or `python pipelines/ferflow_pipeline.py [OUT]`.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: `components` sits beside this folder
    sys.path.insert(0, str(REPO))

from kfp import dsl, kubernetes  # noqa: E402

from components.evaluate import evaluate  # noqa: E402
from components.fetch import fetch  # noqa: E402
from components.prepare import prepare  # noqa: E402
from components.promote import promote  # noqa: E402
from components.register import register  # noqa: E402
from components.report import report  # noqa: E402
from components.train import train  # noqa: E402
from ferflow.pipeline.spec import CompileOptions, PipelineDefaults  # noqa: E402

# Secret keys are the variable names. Only the tracking URI is required: username/password
# or a token depend on the server, and S3 credentials only on where data and artifacts live
# (an MLflow server with --serve-artifacts and public archive URIs need none).
MLFLOW_REQUIRED = ("MLFLOW_TRACKING_URI",)
MLFLOW_OPTIONAL = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")


def build(options: CompileOptions, defaults: PipelineDefaults):
    """The pipeline function for these options, its parameters defaulting to `defaults`."""

    def mlflow_env(task):
        if options.mlflow_secret:
            kubernetes.use_secret_as_env(task, options.mlflow_secret, {k: k for k in MLFLOW_REQUIRED})
            kubernetes.use_secret_as_env(task, options.mlflow_secret, {k: k for k in MLFLOW_OPTIONAL}, optional=True)

    def s3_env(task):
        if options.s3_secret:
            kubernetes.use_secret_as_env(task, options.s3_secret, {k: k for k in S3_KEYS}, optional=True)

    @dsl.pipeline(
        name="ferflow",
        description="Facial-expression recognition under face masks: fetch, prepare, fine-tune, "
                    "evaluate, register and promote every (dataset, model), then the results table.",
    )
    def ferflow(
        base_params: str = defaults.base_params,
        archives: dict = defaults.archives,
        datasets: list = defaults.datasets,
        models: list = defaults.models,
        matrix: list = defaults.matrix,
        overrides: list = [],
        experiment: str = defaults.experiment,
        registered_models: dict = defaults.registered_models,
        dvc_lock: dict = defaults.dvc_lock,
        dvc_remote: str = defaults.dvc_remote,
        image: str = options.image,
    ):
        fetched = fetch(
            base_params=base_params, archives=archives, datasets=datasets, models=models, matrix=matrix,
            overrides=overrides, experiment=experiment, registered_models=registered_models,
            dvc_lock=dvc_lock, dvc_remote=dvc_remote,
        )
        fetched.set_container_image(image)
        fetched.set_caching_options(False)  # sources may change behind a URI; fetch re-verifies
        fetched.set_retry(num_retries=options.fetch_retries, backoff_duration=options.fetch_backoff,
                          backoff_factor=options.fetch_backoff_factor)
        s3_env(fetched)  # s3:// archives and the DVC remote
        kubernetes.set_timeout(fetched, options.task_timeout_s)
        config = fetched.outputs["config"]

        prepared = prepare(config=config, raw=fetched.outputs["raw"])
        prepared.set_container_image(image)
        kubernetes.set_timeout(prepared, options.task_timeout_s)

        with dsl.ParallelFor(matrix, parallelism=options.parallelism, name="dataset-model") as pair:
            trained = train(
                config=config, dataset=pair.dataset, model_name=pair.model,
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, dvc_lock=dvc_lock, prepared=prepared.outputs["prepared"],
            )
            trained.set_container_image(image)
            if options.gpus:
                trained.set_accelerator_type(options.accelerator)
                trained.set_accelerator_limit(options.gpus)
                # GPU nodes are usually tainted so that only GPU work lands there.
                kubernetes.add_toleration(trained, key=options.accelerator, operator="Exists", effect="NoSchedule")
            trained.set_cpu_request(options.train_cpu_request).set_cpu_limit(options.train_cpu_limit)
            trained.set_memory_request(options.train_memory_request).set_memory_limit(options.train_memory_limit)
            for label, value in options.node_selector:
                kubernetes.add_node_selector(trained, label_key=label, label_value=value)
            kubernetes.empty_dir_mount(trained, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                       size_limit=options.shm_size)
            mlflow_env(trained)
            s3_env(trained)  # pretrained weights on s3://, MLflow artifacts stored on S3 directly
            kubernetes.set_timeout(trained, options.train_timeout_s)

            evaluated = evaluate(
                config=config, dataset=pair.dataset, model_name=pair.model, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                prepared=prepared.outputs["prepared"], model=trained.outputs["model"],
            )
            evaluated.set_container_image(image)
            mlflow_env(evaluated)
            s3_env(evaluated)
            kubernetes.set_timeout(evaluated, options.task_timeout_s)

            registered = register(
                config=config, dataset=pair.dataset, model_name=pair.model, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                dvc_lock=dvc_lock, reports=prepared.outputs["reports"], model=trained.outputs["model"],
                evaluation=evaluated.outputs["evaluation"],
            )
            registered.set_container_image(image)
            registered.set_caching_options(False)  # a cached result would skip the registry write
            mlflow_env(registered)
            s3_env(registered)
            kubernetes.set_timeout(registered, options.task_timeout_s)

            promoted = promote(config=config, dataset=pair.dataset).after(registered)
            promoted.set_container_image(image)
            promoted.set_caching_options(False)  # the decision depends on the registry's state now
            mlflow_env(promoted)
            kubernetes.set_timeout(promoted, options.task_timeout_s)

        reported = report(config=config, evaluations=dsl.Collected(evaluated.outputs["evaluation"]))
        reported.set_container_image(image)
        kubernetes.set_timeout(reported, options.task_timeout_s)

    return ferflow


if __name__ == "__main__":
    from ferflow.pipeline.spec import DEFAULT_OUT, compile_pipeline

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / DEFAULT_OUT
    print(compile_pipeline(out, repo=REPO, build=build))
