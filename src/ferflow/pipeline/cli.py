"""`ferflow pipeline compile|submit`: the Kubeflow pipeline from the command line."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, Union

import typer
from rich.console import Console

from ferflow.commandline import (override_help, params_checked, params_loader, params_option, set_option,
                                 typer_app, with_parameters, with_verbose)
from ferflow.config import Params
from ferflow.errors import FerflowError
from ferflow.pipeline import IMAGE_ENV, IMAGE_REPOSITORY
from ferflow.pipeline.spec import DEFAULT_OUT, CompileOptions, PipelineDefaults, compile_pipeline, parse_node_selector
from ferflow.pipeline.submit import DEFAULT_PIPELINE, MAX_CONCURRENCY, cron_problem
from ferflow.pipeline.submit import submit as submit_run

pipeline_app = typer_app("pipeline", "Kubeflow Pipelines: compile the pipeline to YAML, submit runs.")
out = Console()
err = Console(stderr=True)

ParamsOpt = params_option("params file: the run's base params")
BaseSetOpt = set_option(override_help("train.models=[enet_b0_7]", "override a key of the base params"))
RunSetOpt = set_option(override_help("train.datasets=[M-LFW-FER]", "override a params key for this run"))
RepoOpt = Annotated[Path, typer.Option("--repo", help="the ferflow checkout holding pipelines/ and components/")]


# ---------------------------------------------------------------------------- compile options
# CompileOptions owns every option's name, type and default; `compile` and `submit` both
# take all of them through `with_compile_options`. A field's flag is its name (gpu_quota:
# --gpu-quota); this table adds its help, older spellings and, where the CLI value is not
# the field's type, the conversion. A new scalar field works with no row (its help is then
# its name) and test_submit.py fails until it has one.

@dataclasses.dataclass(frozen=True)
class Flag:
    help: str
    aliases: tuple[str, ...] = ()
    cli_type: Any = None  # when the CLI value is not the field's type...
    convert: Optional[Callable[[Any], Any]] = None  # ...this makes the field's value of it
    shown_default: Optional[str] = None  # for a default_factory, which the CLI leaves to CompileOptions


COMPILE_FLAGS: dict[str, Flag] = {
    "image": Flag("container image of every task",
                  shown_default=f"${IMAGE_ENV}, else {IMAGE_REPOSITORY}:src-<digest of the image's inputs>"),
    "gpus": Flag("GPUs per training task (0: train on CPU)"),
    "accelerator": Flag("accelerator resource type"),
    "train_cpu_request": Flag("CPU request of training tasks", ("--train-cpu",)),
    "train_cpu_limit": Flag("CPU limit of training tasks"),
    "train_memory_request": Flag("memory request of training tasks", ("--train-memory",)),
    "train_memory_limit": Flag("memory limit of training tasks"),
    "shm_size": Flag("memory-backed /dev/shm of training tasks"),
    "node_selector": Flag("label=value for training nodes (repeatable)", cli_type=Optional[list[str]],
                          convert=parse_node_selector),
    "mlflow_secret": Flag("Kubernetes Secret with MLFLOW_TRACKING_* keys ('' = none)"),
    "s3_secret": Flag("Kubernetes Secret with AWS_* keys ('' = none)"),
    "fetch_retries": Flag("retries of the fetch task"),
    "fetch_backoff": Flag("first wait before a fetch retry (KFP duration, e.g. 60s)"),
    "fetch_backoff_factor": Flag("growth of the wait between fetch retries"),
    "task_cpu_request": Flag("CPU request of the other data tasks (fetch, evaluate, zero-shot)"),
    "task_cpu_limit": Flag("CPU limit of the other data tasks"),
    "task_memory_request": Flag("memory request of the other data tasks"),
    "task_memory_limit": Flag("memory limit of the other data tasks"),
    "work_storage_class": Flag("StorageClass of the tasks' work volumes ('' = the cluster's default)"),
    "train_timeout_s": Flag("timeout of a training task, seconds"),
    "task_timeout_s": Flag("timeout of every other task, seconds"),
    "gpu_quota": Flag("GPUs the run may hold at once; with --parallelism 0 it sets the concurrent trainings"),
    "parallelism": Flag("concurrent (dataset, model) iterations; 0 = --gpu-quota // --gpus"),
}
_SCALARS = (str, int, float, bool)
_PANEL = "Compile options"
_PREFIX = "compile_option_"  # keeps the options' parameter names clear of a command's own


def compile_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _optional_scalar(hint: Any) -> Optional[type]:
    """T for Optional[T] with T a scalar; else None."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and args[0] in _SCALARS:
            return args[0]
    return None


@functools.cache
def _compile_parameters() -> dict[str, tuple[inspect.Parameter, Optional[Callable[[Any], Any]]]]:
    """field -> (the typer parameter, its Flag.convert); fields whose type has no CLI form
    and no COMPILE_FLAGS row are left out (the test names them)."""
    hints = typing.get_type_hints(CompileOptions)
    found = {}
    for field in dataclasses.fields(CompileOptions):
        flag = COMPILE_FLAGS.get(field.name) or Flag(field.name.replace("_", " "))
        hint = hints[field.name]
        if flag.cli_type is not None:
            cli_type = flag.cli_type
        elif hint in _SCALARS or _optional_scalar(hint):
            cli_type = hint
        else:
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        else:  # a default_factory (the image: $FERFLOW_IMAGE): absent on the CLI, made by CompileOptions
            default, cli_type = None, Optional[cli_type]
        # a bool field is a --x/--no-x flag, never a value to type
        declared = compile_flag(field.name) + (f"/--no-{compile_flag(field.name)[2:]}" if cli_type is bool else "")
        option = typer.Option(declared, *flag.aliases, help=flag.help, rich_help_panel=_PANEL,
                              show_default=flag.shown_default or True)
        parameter = inspect.Parameter(_PREFIX + field.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                      annotation=Annotated[cli_type, option])
        found[field.name] = (parameter, flag.convert)
    return found


def options_from_cli(values: dict[str, Any]) -> CompileOptions:
    """CompileOptions of the CLI values (by field name); an absent value (None) leaves the
    field's own default, e.g. the image's $FERFLOW_IMAGE."""
    parameters = _compile_parameters()
    kwargs = {}
    for name, value in values.items():
        convert = parameters[name][1]
        if convert is not None:
            kwargs[name] = convert(value)
        elif value is not None:
            kwargs[name] = value
    return CompileOptions(**kwargs)


def with_compile_options(command: Callable) -> Callable:
    """`command` with one option per CompileOptions field; it receives them built as its
    `options` argument."""
    parameters = _compile_parameters()
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "options"]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        values = {name: kwargs.pop(_PREFIX + name) for name in parameters}
        return command(*args, options=options_from_cli(values), **kwargs)

    return with_parameters(wrapper, own + [p for p, _ in parameters.values()])


# ---------------------------------------------------------------------------- commands

@pipeline_app.command("compile")
@with_verbose
@with_compile_options
def compile_(
    out_path: Annotated[Path, typer.Option("--out", "-o", help="YAML to write")] = DEFAULT_OUT,
    params: ParamsOpt = Path("params.yaml"),
    set_: BaseSetOpt = None,
    dvc_lock: Annotated[Path, typer.Option(help="dvc.lock whose fetch entries pin the archives")] = Path("dvc.lock"),
    no_dvc: Annotated[bool, typer.Option("--no-dvc", help="do not pin archives to dvc.lock")] = False,
    dvc_remote: Annotated[
        Optional[str], typer.Option(help="DVC remote URL", show_default="the default remote of .dvc/config")
    ] = None,
    repo: RepoOpt = Path("."),
    *,
    options: CompileOptions,
) -> None:
    """Compile the pipeline; parameter defaults come from params.yaml and dvc.lock."""
    defaults = PipelineDefaults.from_checkout(repo, params_file=params, dvc_lock=None if no_dvc else dvc_lock,
                                              dvc_remote=dvc_remote, overrides=set_ or [])
    path = compile_pipeline(out_path, options, defaults, repo)
    pinned = ", ".join(sorted(s.split("@", 1)[1] for s in defaults.dvc_lock.get("stages", {}))) or "none"
    out.print(f"compiled {path} (image {options.image}; archives pinned by dvc.lock: {pinned})")


def _cron(value: Optional[str]) -> Optional[str]:
    """--schedule checked before anything runs (click names the option)."""
    problem = None if value is None else cron_problem(value)
    if problem:
        raise typer.BadParameter(f"{value!r}: {problem}")
    return value and " ".join(value.split())


@pipeline_app.command()
@with_verbose
@with_compile_options
def submit(
    host: Annotated[str, typer.Option("--host", help="Kubeflow Pipelines API endpoint, e.g. http://localhost:8080")],
    namespace: Annotated[
        Optional[str], typer.Option(help="Kubeflow profile namespace (multi-user); the pipeline is uploaded there")
    ] = None,
    experiment: Annotated[
        Optional[str], typer.Option(help="KFP experiment, created when missing", show_default="tracking.experiment")
    ] = None,
    run_name: Annotated[Optional[str], typer.Option(help="display name of the run")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: RunSetOpt = None,
    token_env: Annotated[
        Optional[str],
        typer.Option(help="environment variable holding the API token", show_default="KFP_EXISTING_TOKEN"),
    ] = None,
    pipeline_name: Annotated[
        str, typer.Option(help="KFP pipeline to add the version to (uploaded on first use)")
    ] = DEFAULT_PIPELINE,
    package: Annotated[
        Optional[Path],
        typer.Option(help="submit this compiled YAML (version named by its sha256) instead of compiling the checkout"),
    ] = None,
    schedule: Annotated[
        Optional[str],
        typer.Option(callback=_cron, help="start a recurring run on this KFP cron, 6 fields with seconds first, "
                                          "e.g. '0 0 3 * * *' (03:00 daily)"),
    ] = None,
    schedule_name: Annotated[
        Optional[str], typer.Option(help="display name of the recurring run", show_default="pipeline and version")
    ] = None,
    max_concurrency: Annotated[
        int, typer.Option(min=1, max=MAX_CONCURRENCY, help="recurring run: runs at once")
    ] = 1,
    catchup: Annotated[
        bool, typer.Option("--catchup/--no-catchup", help="recurring run: start the runs missed while paused")
    ] = False,
    repo: RepoOpt = Path("."),
    *,
    options: CompileOptions,
) -> None:
    """Upload the pipeline as a version named by the checkout's commit and start a run of
    it (or a recurring run with --schedule); prints the run's URL."""
    if package is not None and options != CompileOptions():
        raise FerflowError("--package: the compile options apply only when submit compiles the checkout; "
                           "drop them or compile the package with them")
    run = submit_run(
        host, params_file=params, overrides=set_ or [], namespace=namespace, experiment=experiment,
        run_name=run_name, token_env=token_env, package=package, options=options, repo=repo,
        pipeline_name=pipeline_name, schedule=schedule, schedule_name=schedule_name,
        max_concurrency=max_concurrency, catchup=catchup,
    )
    what = f"recurring run ({run.schedule})" if run.schedule else "run"
    err.print(f"pipeline {pipeline_name} version {run.version_name} "
              f"({'reused' if run.version_reused else 'uploaded'}), experiment {run.experiment}: {what} {run.run_id}",
              highlight=False, soft_wrap=True)
    out.print(run.url, highlight=False, soft_wrap=True)


@pipeline_app.command("image-tag")
@params_checked(example="seed=7")  # the tag is a digest of the image's inputs alone
def image_tag_() -> None:
    """Print the image reference this checkout's pipeline runs (`make image` builds it)."""
    from ferflow.pipeline import image_tag

    tag = image_tag()
    if tag is None:
        raise FerflowError("not a ferflow checkout (no Dockerfile and src/ beside the package): no image tag")
    print(f"{IMAGE_REPOSITORY}:{tag}")


@pipeline_app.command("trainjob")
@params_loader("params file, put in the job's ConfigMap", override_help("train.batch_size=64", "override a params key"))
def trainjob(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="dataset to fine-tune on (data.archives/unions)")],
    model: Annotated[str, typer.Option("--model", "-m", help="zoo name (see `ferflow models`) or timm:<arch>")],
    nodes: Annotated[int, typer.Option("--nodes", help="training nodes (pods)")] = 2,
    gpus_per_node: Annotated[int, typer.Option("--gpus-per-node", help="GPUs, and so ranks, per node (0: CPU)")] = 1,
    image: Annotated[Optional[str], typer.Option("--image", help="container image [default: $FERFLOW_IMAGE, else "
                                                 "this checkout's (`ferflow pipeline image-tag`)]")] = None,
    *,
    cfg: Params,  # a bad params file fails here, not in a pod
    out_path: Annotated[Optional[Path], typer.Option("--out", "-o", help="YAML to write [default: stdout]")] = None,
    name: Annotated[Optional[str], typer.Option(help="TrainJob name [default: ferflow-DATASET-MODEL]")] = None,
    namespace: Annotated[Optional[str], typer.Option(help="namespace [default: kubectl's]")] = None,
    cpu: Annotated[str, typer.Option(help="CPU per node")] = "8",
    memory: Annotated[str, typer.Option(help="memory per node")] = "32Gi",
    accelerator: Annotated[str, typer.Option(help="GPU resource name")] = "nvidia.com/gpu",
    shm_size: Annotated[str, typer.Option(help="memory-backed /dev/shm per node")] = "8Gi",
    runtime: Annotated[str, typer.Option(help="ClusterTrainingRuntime to run under")] = "torch-distributed",
    mlflow_secret: Annotated[str, typer.Option(help="Secret with MLFLOW_TRACKING_* keys ('' = none)")]
    = "ferflow-mlflow",
    s3_secret: Annotated[str, typer.Option(help="Secret with AWS_* keys ('' = none)")] = "ferflow-s3",
) -> None:
    """Write a Kubeflow Trainer TrainJob (plus its params ConfigMap) that trains on several nodes."""
    from ferflow.pipeline import configured_image
    from ferflow.pipeline.trainjob import dump_documents, trainjob_documents

    documents = trainjob_documents(
        cfg, dataset=dataset, model=model, name=name, namespace=namespace, image=configured_image() if image is None else image,
        num_nodes=nodes, gpus_per_node=gpus_per_node, cpu=cpu, memory=memory, accelerator=accelerator,
        shm_size=shm_size, runtime=runtime, mlflow_secret=mlflow_secret, s3_secret=s3_secret,
    )
    text = dump_documents(documents)
    job = documents[-1]["metadata"]["name"]
    note = Console(stderr=True)  # stdout may be the YAML itself
    if out_path is None:
        typer.echo(text, nl=False)
        target = "-  (pipe this output)"
    else:
        try:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise FerflowError(f"cannot write {out_path}: {exc}") from None
        target = str(out_path)
        note.print(f"wrote {out_path}: ConfigMap {job}-params and TrainJob {job}", highlight=False, soft_wrap=True)
    ns = f" -n {namespace}" if namespace else ""
    note.print(f"submit: kubectl apply{ns} -f {target}\nwatch:  kubectl get trainjob{ns} {job}", highlight=False,
               soft_wrap=True)
    if not cfg.tracking.enabled:
        note.print("warning: tracking.enabled is false; the trained run stays in rank 0's pod and is lost with it",
                   highlight=False)
