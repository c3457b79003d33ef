"""The ferflow pipeline for Kubeflow Pipelines (KFP v2), the same graph as dvc.yaml.

    fetch -> for each (dataset, model) in `matrix`:  train -> evaluate -> register
          -> for each model in `models`:             zero-shot
          -> promote (once per dataset, after every registration)
          -> report (every evaluation and zero-shot row, gathered with dsl.Collected)

dvc.yaml's prepare stages happen inside train, evaluate and zero-shot: each task decodes
only its datasets at its own model's size from the verified archives (train downloads just
its own; evaluate and zero-shot read fetch's `raw`), so no artifact carries gigabytes of
decoded images to every pod (benchmarks/bench_pipeline.py counts the bytes).

Every component calls the same `ferflow.stages` functions as the CLI and dvc.yaml. The
parameters mirror params.yaml (base params, archives, datasets, models, experiment,
registered model names, `key=value` overrides); `matrix` is datasets x models, flattened
because kfp.local iterates only over pipeline parameters and mishandles nested loops.

Caching: fetch, train, evaluate, zero-shot and report are cached. Their inputs are the
params and the archives' sha256 (content-addressed), never a run-unique value, so a
resubmission of the same params and data hits the cache from fetch on. The KFP run id
reaches MLflow from the pod's `pipeline/runid` label (an env from the Downward API, not an
input) and as an input of register, which is never cached, as promote is not.

Cluster settings (GPU, tolerations, node selector, /dev/shm, secrets as env, retries,
timeouts, CPU / memory requests, a work volume sized from the data) sit next to the task
they apply to; kfp.local ignores them and the compiled YAML carries them (kfp-kubernetes
ones in its second document). The `image` parameter (set_container_image) needs a KFP
backend >= 2.4.

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
from components.promote import promote  # noqa: E402
from components.register import register  # noqa: E402
from components.report import report  # noqa: E402
from components.train import train  # noqa: E402
from components.zero_shot import zero_shot  # noqa: E402
from ferflow.config import validate  # noqa: E402
from ferflow.cpus import CPUS_ENV  # noqa: E402
from ferflow.pipeline import MLFLOW_OPTIONAL, MLFLOW_REQUIRED, S3_KEYS, sizing  # noqa: E402
from ferflow.pipeline.glue import RUN_ID_ENV, RUN_ID_FIELD, WORK_DIR_ENV, resolve_config  # noqa: E402
from ferflow.pipeline.spec import CompileOptions, PipelineDefaults  # noqa: E402



# register, promote and report move megabytes and call MLflow: small, fixed requests.
SMALL_CPU, SMALL_CPU_LIMIT, SMALL_MEMORY, SMALL_MEMORY_LIMIT = "1", "2", "2Gi", "4Gi"
WORK_DIR = "/ferflow-work"  # each task's work volume: archives, image caches, outputs


def build(options: CompileOptions, defaults: PipelineDefaults):
    """The pipeline function for these options, its parameters defaulting to `defaults`."""
    import yaml

    # The defaults size the disks (a run with other archives or models can override them).
    sized = validate(yaml.safe_load(resolve_config(
        defaults.base_params, archives=defaults.archives, datasets=defaults.datasets, models=defaults.models,
    )), origin="pipeline defaults")

    def mlflow_env(task):
        if options.mlflow_secret:
            kubernetes.use_secret_as_env(task, options.mlflow_secret, {k: k for k in MLFLOW_REQUIRED})
            kubernetes.use_secret_as_env(task, options.mlflow_secret, {k: k for k in MLFLOW_OPTIONAL}, optional=True)

    def s3_env(task):
        if options.s3_secret:
            kubernetes.use_secret_as_env(task, options.s3_secret, {k: k for k in S3_KEYS}, optional=True)

    def resources(task, kind: str, cpu: str, cpu_limit: str, memory: str, memory_limit: str):
        """Requests and limits, the decode processes from the CPU request (FERFLOW_CPUS),
        and a generic ephemeral volume for the work files sized from the data."""
        task.set_cpu_request(cpu).set_cpu_limit(cpu_limit).set_memory_request(memory).set_memory_limit(memory_limit)
        task.set_env_variable(CPUS_ENV, cpu)
        task.set_env_variable(WORK_DIR_ENV, WORK_DIR)
        kubernetes.add_ephemeral_volume(
            task, volume_name="work", mount_path=WORK_DIR, access_modes=["ReadWriteOnce"],
            size=sizing.disk_request(sized, kind), storage_class_name=options.work_storage_class or None,
        )
        kubernetes.set_timeout(task, options.train_timeout_s if kind == "train" else options.task_timeout_s)

    def data_task(task, kind: str):
        resources(task, kind, options.task_cpu_request, options.task_cpu_limit, options.task_memory_request,
                  options.task_memory_limit)

    def small_task(task, kind: str):
        resources(task, kind, SMALL_CPU, SMALL_CPU_LIMIT, SMALL_MEMORY, SMALL_MEMORY_LIMIT)

    @dsl.pipeline(
        name="ferflow",
        description="Facial-expression recognition under face masks: fetch, fine-tune, evaluate and register "
                    "every (dataset, model), zero-shot baselines, promote per dataset, then the results table.",
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
        fetched.set_retry(num_retries=options.fetch_retries, backoff_duration=options.fetch_backoff,
                          backoff_factor=options.fetch_backoff_factor)
        data_task(fetched, "fetch")
        s3_env(fetched)  # s3:// archives and the DVC remote
        config, raw = fetched.outputs["config"], fetched.outputs["raw"]

        with dsl.ParallelFor(matrix, parallelism=options.concurrent_trainings, name="dataset-model") as pair:
            trained = train(config=config, dataset=pair.dataset, model_name=pair.model, dvc_lock=dvc_lock,
                            dvc_remote=dvc_remote, gpus=options.gpus)
            trained.set_container_image(image)
            if options.gpus:
                trained.set_accelerator_type(options.accelerator)
                trained.set_accelerator_limit(options.gpus)
                # GPU nodes are usually tainted so that only GPU work lands there.
                kubernetes.add_toleration(trained, key=options.accelerator, operator="Exists", effect="NoSchedule")
            resources(trained, "train", options.train_cpu_request, options.train_cpu_limit,
                      options.train_memory_request, options.train_memory_limit)
            for label, value in options.node_selector:
                kubernetes.add_node_selector(trained, label_key=label, label_value=value)
            kubernetes.empty_dir_mount(trained, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                       size_limit=options.shm_size)
            kubernetes.use_field_path_as_env(trained, RUN_ID_ENV, RUN_ID_FIELD)
            mlflow_env(trained)
            s3_env(trained)  # its archives, pretrained weights on s3://, MLflow artifacts on S3

            evaluated = evaluate(config=config, dataset=pair.dataset, model_name=pair.model, raw=raw,
                                 model=trained.outputs["model"])
            evaluated.set_container_image(image)
            data_task(evaluated, "evaluate")
            kubernetes.use_field_path_as_env(evaluated, RUN_ID_ENV, RUN_ID_FIELD)
            mlflow_env(evaluated)
            s3_env(evaluated)

            registered = register(
                config=config, dataset=pair.dataset, model_name=pair.model, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                dvc_lock=dvc_lock, reports=trained.outputs["reports"], model=trained.outputs["model"],
                evaluation=evaluated.outputs["evaluation"],
            )
            registered.set_container_image(image)
            registered.set_caching_options(False)  # a cached result would skip the registry write
            small_task(registered, "register")
            mlflow_env(registered)
            s3_env(registered)

        with dsl.ParallelFor(models, name="zero-shot-model") as model_name:
            baseline = zero_shot(config=config, model_name=model_name, raw=raw)
            baseline.set_container_image(image)
            data_task(baseline, "zero-shot")
            s3_env(baseline)  # pretrained weights on s3://

        promoted = promote(config=config, registered=dsl.Collected(registered.outputs["registered"]))
        promoted.set_container_image(image)
        promoted.set_caching_options(False)  # the decision depends on the registry's state now
        small_task(promoted, "promote")
        mlflow_env(promoted)

        reported = report(config=config, evaluations=dsl.Collected(evaluated.outputs["evaluation"]),
                          zero_shots=dsl.Collected(baseline.outputs["evaluation"]))
        reported.set_container_image(image)
        small_task(reported, "report")

    return ferflow


if __name__ == "__main__":
    from ferflow.pipeline.spec import DEFAULT_OUT, compile_pipeline

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / DEFAULT_OUT
    print(compile_pipeline(out, repo=REPO, build=build))
