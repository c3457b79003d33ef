"""KFP artifacts <-> the paths ferflow's stages read and write, for the components.

Lightweight components are serialised as source, so what they share lives in this package,
importable inside the image: here the run's config and each task's workspace, in
`ferflow.pipeline.artifacts` what a task publishes. The fetch component turns the pipeline
parameters into one validated params document (`resolve_config`), published as the
`config` artifact that every other task reads. Each component runs its stage inside
`workspace`, which writes that document as params.yaml with the stage's folders pointing at
the task's artifacts; `prepare_at` prepares a task's datasets there.

Artifact layouts are the stage folders themselves, so a stage never knows it runs in KFP:

    config       params.yaml        the run's resolved params
    raw          data.raw_dir       <name>.zip for every archive (verified, content-addressed)
    reports      data.prepared_dir  <dataset>/report.json only (what lineage reads)
    model        train.out_dir      <dataset>/<model>/ best.safetensors, run.json, ...
    evaluation   evaluate.out_dir   fine-tuned/<dataset>/<model>/... or zero-shot/none/<model>/...

No artifact carries decoded images: a task prepares its datasets at its own model's size
from the verified archives (`stages.fetch`, `prepare_at`), on its own disk. The uint8
caches are ~10x the JPEG archives, so this moves the least (benchmarks/bench_pipeline.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from itertools import product
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import yaml

from ferflow import layout
from ferflow.config import Params, apply_override, dump_params, load_params, parse_override, validate
from ferflow.errors import ConfigError, FerflowError
from ferflow.redact import install_log_filter

RUN_ID_ENV = "KFP_RUN_ID"  # read by ferflow.tracking.lineage into the `kfp.run_id` tag
# A pod's run id, read by Kubernetes into RUN_ID_ENV: the label the KFP backend puts on
# every pod, so cached tasks need no run-unique input.
RUN_ID_FIELD = "metadata.labels['pipeline/runid']"
WORK_DIR_ENV = "FERFLOW_WORK_DIR"  # the task's work volume, when it has one
PARAMS_FILE = "params.yaml"
DVC_LOCK = "dvc.lock"  # lineage reads ./dvc.lock: the pinned archive md5s reach the MLflow tags

# Artifact role -> the params key that names its folder.
PATH_KEYS = {
    "raw": ("data", "raw_dir"),
    "prepared": ("data", "prepared_dir"),
    "models": ("train", "out_dir"),
    "evaluation": ("evaluate", "out_dir"),
    "report": ("report", "out_dir"),
}

PathInput = Union[str, list]


# ---------------------------------------------------------------------------- config


def matrix(datasets: Iterable[str], models: Iterable[str]) -> list[dict]:
    """The (dataset, model) pairs the pipeline loops over: train.datasets x train.models."""
    return [{"dataset": d, "model": m} for d, m in product(datasets, models)]


def resolve_config(
    base_params: Union[Mapping, str],
    *,
    archives: Optional[Mapping] = None,
    datasets: Optional[list] = None,
    models: Optional[list] = None,
    pairs: Optional[list] = None,
    experiment: str = "",
    registered_models: Optional[Mapping] = None,
    overrides: Iterable[str] = (),
) -> str:
    """The params document every task of a run uses: base params, then the structured
    pipeline parameters (empty = keep the base value), then `key=value` overrides exactly
    like the CLI's --set. Validated here, so a bad run fails in its first task."""
    origin = "pipeline parameter base_params"
    if isinstance(base_params, str):
        try:
            base_params = yaml.safe_load(base_params) if base_params.strip() else {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{origin}: not valid YAML: {exc}") from None
    tree = _plain(base_params)
    if not isinstance(tree, dict):
        raise ConfigError(f"{origin}: expected a mapping of params keys")
    structured = {"data.archives": archives, "train.datasets": datasets, "train.models": models,
                  "tracking.experiment": experiment}
    for key, value in structured.items():
        if value:
            apply_override(tree, key.split("."), _plain(value), origin=f"pipeline parameter for {key}")
    if registered_models:
        names = tree.setdefault("registry", {}).setdefault("names", {}) or {}
        tree["registry"]["names"] = {**names, **_plain(registered_models)}
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(tree, keys, value, origin=f"overrides: {text}")
    params = validate(tree, origin="pipeline parameters")
    from ferflow import stages

    stages.check_names(params, params.require_train().datasets, params.require_train().models)
    if pairs is not None:
        _check_pairs(params, pairs)
    return yaml.safe_dump(dump_params(params), sort_keys=False)


def publish_config(artifact, config: str) -> None:
    """The resolved params as an artifact: it reaches every task (kfp.local 2.17 swaps a
    task-output parameter that enters a ParallelFor for the loop item; artifacts pass
    intact) and the KFP UI shows the exact config of the run."""
    path = Path(artifact.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config, encoding="utf-8")
    artifact.metadata["format"] = "params.yaml"


def _plain(value: Any) -> Any:
    """A deep copy in plain JSON types. KFP keeps struct parameters as protobuf Values,
    whose numbers are all doubles: 42 arrives as 42.0, so whole floats become ints again
    (validation turns them back into floats where params want floats)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _check_pairs(params: Params, pairs: list) -> None:
    """The loop runs over `matrix` (kfp.local iterates only over pipeline parameters, not
    task outputs); it must be exactly train.datasets x train.models."""
    train = params.require_train()
    expected = matrix(train.datasets, train.models)
    got = [{"dataset": p.get("dataset"), "model": p.get("model")} if isinstance(p, dict) else p for p in pairs]
    if sorted(map(json.dumps, got)) != sorted(map(json.dumps, expected)):
        raise ConfigError(
            f"pipeline parameter matrix: {json.dumps(pairs)} is not train.datasets x train.models "
            f"({json.dumps(expected)}); set it to that list (`ferflow pipeline submit` computes it)"
        )


# ---------------------------------------------------------------------------- workspace


@contextmanager
def workspace(
    config: Union[str, os.PathLike],
    *,
    run_id: str = "",
    dvc_lock: Union[Mapping, str, None] = None,
    inputs: Optional[Mapping[str, PathInput]] = None,
    outputs: Optional[Mapping[str, str]] = None,
) -> Iterator[Params]:
    """Run a stage in a fresh directory whose params.yaml is the resolved params file
    `config` with every stage folder pointed at the task's artifacts; yields the Params.

    `outputs`: role -> artifact path, written by the stage directly. `inputs`: role ->
    artifact path (linked in, never written) or a list of paths (copied and merged).
    Roles not given get an empty folder in the workspace. The run id becomes KFP_RUN_ID.
    """
    inputs, outputs = dict(inputs or {}), dict(outputs or {})
    unknown = (set(inputs) | set(outputs)) - set(PATH_KEYS)
    if unknown:
        raise ValueError(f"unknown artifact roles {sorted(unknown)}; known: {sorted(PATH_KEYS)}")
    # Task logs are what a KFP user reads; the stages report progress through logging.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    install_log_filter()
    launch = Path.cwd()
    work = os.environ.get(WORK_DIR_ENV, "").strip()
    root = Path(tempfile.mkdtemp(prefix="ferflow-task-", dir=work if work and Path(work).is_dir() else None))
    saved_run_id = os.environ.get(RUN_ID_ENV)
    try:
        tree = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
        _anchor_tracking(tree, launch)
        for role, (section, key) in PATH_KEYS.items():
            if tree.get(section) is None:
                continue  # e.g. no `train` section: nothing of it to point anywhere
            if role in outputs:
                path = Path(outputs[role])
                path.mkdir(parents=True, exist_ok=True)
            elif role in inputs:
                path = root / role
                _assemble(inputs[role], path)
            else:
                path = root / role
                path.mkdir()
            tree[section][key] = str(path)
        (root / PARAMS_FILE).write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
        if dvc_lock:
            text = dvc_lock if isinstance(dvc_lock, str) else yaml.safe_dump(_plain(dvc_lock), sort_keys=False)
            (root / DVC_LOCK).write_text(text, encoding="utf-8")
        if run_id and not run_id.startswith("{{"):  # an unresolved placeholder is no run id
            os.environ[RUN_ID_ENV] = run_id
        os.chdir(root)
        yield load_params(root / PARAMS_FILE)
    finally:
        os.chdir(launch)
        if saved_run_id is None:
            os.environ.pop(RUN_ID_ENV, None)
        else:
            os.environ[RUN_ID_ENV] = saved_run_id
        shutil.rmtree(root, ignore_errors=True)  # links only: the artifacts stay


def _anchor_tracking(tree: dict, launch: Path) -> None:
    """A relative embedded MLflow store means the launch directory's, as for the CLI (and
    for kfp.local, whose tasks all start there); on a cluster MLFLOW_TRACKING_URI wins."""
    tracking = tree.get("tracking") or {}
    uri = str(tracking.get("tracking_uri", ""))
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        tracking["tracking_uri"] = prefix + str(launch / uri[len(prefix):])
    location = str(tracking.get("artifact_location", ""))
    if location and "://" not in location and not Path(location).is_absolute():
        tracking["artifact_location"] = str(launch / location)


def _assemble(source: PathInput, dest: Path) -> None:
    dest.mkdir(parents=True)
    if isinstance(source, (list, tuple)):
        # Several artifacts of one layout (e.g. evaluations): merged copies, small files.
        for path in source:
            shutil.copytree(path, dest, dirs_exist_ok=True, symlinks=True)
        return
    src = Path(source)
    if not src.is_dir():
        raise FerflowError(f"input artifact {src} is not a folder; was it produced by this pipeline's components?")
    for entry in src.iterdir():
        (dest / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())


def prepare_at(params: Params, datasets: Iterable[str], model: str) -> int:
    """Prepare these datasets from data.raw_dir at `model`'s input size only (what this
    task reads), with one decode process per CPU the task requested; returns the size."""
    from ferflow import stages
    from ferflow.models import zoo

    datasets = list(datasets)
    stages.check_names(params, datasets, [model])
    size = zoo.input_size(model, params.require_train().input_size)
    prepare = params.prepare.model_copy(update={"image_sizes": [size]})
    stages.prepare(params.model_copy(update={"prepare": prepare}), list(datasets))
    return size


def run_dir(params: Params, dataset: str, model: str) -> Path:
    """Where the train stage puts (and register reads) a run directory."""
    from ferflow import stages

    stages.check_names(params, [dataset], [model])
    return layout.run_dir(params.require_train().out_dir, dataset, model)
