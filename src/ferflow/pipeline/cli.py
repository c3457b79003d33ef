"""`ferflow pipeline compile|submit`: the Kubeflow pipeline from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ferflow.pipeline import DEFAULT_IMAGE, IMAGE_ENV, configured_image
from ferflow.pipeline.spec import DEFAULT_OUT, CompileOptions, PipelineDefaults, compile_pipeline, parse_node_selector

pipeline_app = typer.Typer(
    name="pipeline",
    help="Kubeflow Pipelines: compile the pipeline to YAML, submit runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()

ImageOpt = Annotated[
    Optional[str],
    typer.Option("--image", help=f"container image of every task [default: ${IMAGE_ENV} or {DEFAULT_IMAGE}]"),
]
ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file: the run's base params")]
RepoOpt = Annotated[Path, typer.Option("--repo", help="the ferflow checkout holding pipelines/ and components/")]


@pipeline_app.command("compile")
def compile_(
    out_path: Annotated[Path, typer.Option("--out", "-o", help="YAML to write")] = DEFAULT_OUT,
    image: ImageOpt = None,
    gpus: Annotated[int, typer.Option(help="GPUs per training task (0: train on CPU)")] = 1,
    accelerator: Annotated[str, typer.Option(help="accelerator resource type")] = "nvidia.com/gpu",
    train_cpu: Annotated[str, typer.Option(help="CPU request of training tasks")] = "4",
    train_cpu_limit: Annotated[str, typer.Option(help="CPU limit of training tasks")] = "8",
    train_memory: Annotated[str, typer.Option(help="memory request of training tasks")] = "16Gi",
    train_memory_limit: Annotated[str, typer.Option(help="memory limit of training tasks")] = "32Gi",
    shm_size: Annotated[str, typer.Option(help="memory-backed /dev/shm of training tasks")] = "8Gi",
    node_selector: Annotated[
        Optional[list[str]], typer.Option("--node-selector", help="label=value for training nodes (repeatable)")
    ] = None,
    mlflow_secret: Annotated[str, typer.Option(help="Kubernetes Secret with MLFLOW_TRACKING_* keys ('' = none)")]
    = "ferflow-mlflow",
    s3_secret: Annotated[str, typer.Option(help="Kubernetes Secret with AWS_* keys ('' = none)")] = "ferflow-s3",
    fetch_retries: Annotated[int, typer.Option(help="retries of the fetch task")] = 3,
    parallelism: Annotated[int, typer.Option(help="concurrent (dataset, model) iterations; 0 = no limit")] = 0,
    params: ParamsOpt = Path("params.yaml"),
    dvc_lock: Annotated[Path, typer.Option(help="dvc.lock whose fetch entries pin the archives")] = Path("dvc.lock"),
    no_dvc: Annotated[bool, typer.Option("--no-dvc", help="do not pin archives to dvc.lock")] = False,
    dvc_remote: Annotated[
        Optional[str], typer.Option(help="DVC remote URL [default: the default remote of .dvc/config]")
    ] = None,
    repo: RepoOpt = Path("."),
) -> None:
    """Compile the pipeline; parameter defaults come from params.yaml and dvc.lock."""
    options = CompileOptions(
        image=image or configured_image(), gpus=gpus, accelerator=accelerator, train_cpu_request=train_cpu,
        train_cpu_limit=train_cpu_limit, train_memory_request=train_memory, train_memory_limit=train_memory_limit,
        shm_size=shm_size, node_selector=parse_node_selector(node_selector), mlflow_secret=mlflow_secret,
        s3_secret=s3_secret, fetch_retries=fetch_retries, parallelism=parallelism,
    )
    defaults = PipelineDefaults.from_checkout(repo, params_file=params, dvc_lock=None if no_dvc else dvc_lock,
                                              dvc_remote=dvc_remote)
    path = compile_pipeline(out_path, options, defaults, repo)
    pinned = ", ".join(sorted(s.split("@", 1)[1] for s in defaults.dvc_lock.get("stages", {}))) or "none"
    out.print(f"compiled {path} (image {options.image}; archives pinned by dvc.lock: {pinned})")


@pipeline_app.command()
def submit(
    host: Annotated[str, typer.Option("--host", help="Kubeflow Pipelines API endpoint, e.g. http://localhost:8080")],
    namespace: Annotated[Optional[str], typer.Option(help="Kubeflow profile namespace (multi-user)")] = None,
    experiment: Annotated[
        Optional[str], typer.Option(help="KFP experiment [default: tracking.experiment]")
    ] = None,
    run_name: Annotated[Optional[str], typer.Option(help="display name of the run")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", "-s", help="override a params key for this run (repeatable)")
    ] = None,
    token_env: Annotated[
        Optional[str], typer.Option(help="environment variable holding the API token [default: KFP_EXISTING_TOKEN]")
    ] = None,
    package: Annotated[
        Optional[Path], typer.Option(help="submit this compiled YAML instead of compiling the checkout")
    ] = None,
    image: ImageOpt = None,
    repo: RepoOpt = Path("."),
) -> None:
    """Start a pipeline run with these params; prints the run's URL."""
    from ferflow.pipeline.submit import submit as submit_run

    run = submit_run(
        host, params_file=params, overrides=set_ or [], namespace=namespace, experiment=experiment,
        run_name=run_name, token_env=token_env, package=package,
        options=CompileOptions(image=image or configured_image()), repo=repo,
    )
    out.print(run.url, highlight=False, soft_wrap=True)
