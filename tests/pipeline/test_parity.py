"""dvc.yaml and the KFP pipeline: the same entry points and the same graph.

Both sides are observed, not assumed: each dvc.yaml command goes through the real CLI
and each component function runs for real, with every `ferflow.stages` function replaced
by a recorder that stops at the stage's own call (the data stages a task runs first, fetch
and prepare, are recorded and passed). Statically, each component stays a short adapter
(no second implementation of a stage). The graphs match: dvc.yaml's stage dependencies,
with prepare folded into the tasks that prepare in-task, are the pipeline's task edges."""

import ast
import inspect
import json
import shlex
from pathlib import Path

import pytest
import yaml

from ferflow import stages
from ferflow.pipeline import glue
from ferflow.pipeline.spec import PipelineDefaults

from . import REPO

COMPONENTS = ("fetch", "train", "evaluate", "zero_shot", "register", "promote", "report")
DATA_STAGES = ("fetch", "prepare")  # what a task may run in-task before its own stage
STAGE_FUNCTIONS = ("fetch", "prepare", "demo_data", "train", "evaluate", "zero_shot", "report", "register", "promote")
MAX_BODY_LINES = 20  # statements after the docstring: an adapter, not an implementation
DATASET, MODEL = "LFW-FER", "demo_tiny"


class Reached(Exception):
    """Raised by the recorder in place of a stage function."""


class Calls(list):
    passthrough: set = set()
    keywords: dict = {}  # stage -> the keyword arguments of its last call


@pytest.fixture
def recorded(monkeypatch):
    calls = Calls()
    calls.keywords = {}

    def recorder(name):
        def stage(*args, **kwargs):
            calls.append(name)
            calls.keywords[name] = sorted(kwargs)
            if name in calls.passthrough:
                return []
            raise Reached(name)
        return stage

    for name in STAGE_FUNCTIONS:
        monkeypatch.setattr(stages, name, recorder(name))
    return calls


def _dvc_commands() -> dict[str, str]:
    """dvc.yaml stage name -> its command with one sample item filled in."""
    commands = {}
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        cmd = (stage.get("do") or stage)["cmd"]
        foreach = str(stage.get("foreach", ""))
        item = DATASET if "datasets" in foreach or "archives" in foreach or "unions" in foreach else MODEL
        sample = {"key": DATASET, "item.dataset": DATASET, "item.model": MODEL, "item": item}
        for key, value in sample.items():
            cmd = cmd.replace("${" + key + "}", value)
        commands[name] = cmd
    return commands


def _cli_stage(cmd: str, calls: list) -> str:
    from ferflow import cli

    argv = shlex.split(cmd)
    assert argv[0] == "ferflow", cmd
    calls.clear()
    with pytest.raises(Reached):
        cli.main([*argv[1:], "--params", str(REPO / "params.yaml")])
    assert len(calls) == 1, (cmd, calls)
    return calls[0]


def _component(name: str):
    import importlib

    return getattr(importlib.import_module(f"components.{name}"), name)


def _run_component(name: str, tmp_path: Path, calls: list) -> str:
    """Call the component's Python function as KFP's executor would, with artifacts in tmp."""
    from kfp import dsl

    defaults = PipelineDefaults.from_checkout(REPO)
    config = tmp_path / "resolved-params.yaml"
    config.write_text(glue.resolve_config(defaults.base_params))
    values = {
        "base_params": defaults.base_params, "archives": defaults.archives, "datasets": defaults.datasets,
        "models": defaults.models, "matrix": defaults.matrix, "overrides": [], "experiment": defaults.experiment,
        "registered_models": defaults.registered_models, "dvc_lock": {}, "dvc_remote": "",
        "dataset": DATASET, "model_name": MODEL, "run_id": "run-1", "gpus": 1,
    }
    kwargs = {}
    for param, annotation in inspect.signature(_component(name).python_func).parameters.items():
        if param == "config" and "Input" in str(annotation.annotation):
            kwargs[param] = dsl.Artifact(name=param, uri=str(config))
        elif param in values:
            kwargs[param] = values[param]
        elif "List" in str(annotation.annotation):
            kwargs[param] = []
        else:  # other artifacts: inputs are empty folders, outputs do not exist yet
            if "Input" in str(annotation.annotation):
                (tmp_path / param).mkdir()
            kwargs[param] = dsl.Artifact(name=param, uri=str(tmp_path / param))
    calls.clear()
    calls.passthrough = set(DATA_STAGES) - {name}
    try:
        with pytest.raises(Reached):
            _component(name).python_func(**kwargs)
    finally:
        calls.passthrough = set()
    assert set(calls[:-1]) <= set(DATA_STAGES), (name, calls)
    return calls[-1]


def test_dvc_stages_and_components_call_the_same_stage_functions(recorded, tmp_path):
    via_dvc = {name: _cli_stage(cmd, recorded) for name, cmd in _dvc_commands().items()}
    dvc_fetch_keywords = recorded.keywords["fetch"]
    for name in ("fetch", "prepare", "train", "evaluate", "report"):
        assert via_dvc[name] == name, (name, via_dvc[name])
    assert via_dvc["zero-shot"] == "zero_shot"
    assert via_dvc["prepare-union"] == "prepare"  # a union is prepared like any dataset
    via_kfp = {}
    for name in COMPONENTS:
        (tmp_path / name).mkdir()
        via_kfp[name.replace("_", "-")] = _run_component(name, tmp_path / name, recorded)
    for name, function in via_kfp.items():
        assert function == via_dvc[name], name
    # One fetch: both hold the archives to dvc.lock's pins and can take them from the DVC remote.
    assert dvc_fetch_keywords == recorded.keywords["fetch"] == ["dvc_lock", "dvc_remote"]
    # dvc.yaml's prepare stages run inside train, evaluate and zero-shot (observed above).
    assert set(via_dvc) - set(via_kfp) == {"prepare", "prepare-union"}


def _dvc_edges() -> set:
    """(upstream, downstream) stage families of dvc.yaml, prepare folded into its consumers."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        edges = {(str(b.name).split("@")[0], str(a.name).split("@")[0]) for a, b in repo.index.graph.edges()}
    folded = {"prepare", "prepare-union"}
    sources = {up for up, down in edges if down in folded}
    edges |= {(src, down) for up, down in edges if up in folded for src in sources}
    return {(up, down) for up, down in edges if up not in folded and down not in folded}


def _kfp_edges() -> dict:
    """(producer, consumer) task families of the compiled pipeline -> what flows (artifact
    names, or `after`), loops looked through: a channel names its producing task."""
    spec = yaml.safe_load((REPO / "pipelines" / "ferflow.yaml").read_text().split("\n---\n")[0])
    edges: dict = {}

    def producer(ref: str) -> tuple[str, str]:
        channel = ref.removeprefix("pipelinechannel--")
        for task in ("zero-shot", "fetch", "train", "evaluate", "register"):
            if channel.startswith(task + "-"):
                return task, channel[len(task) + 1:]
        raise AssertionError(f"unknown channel {ref}")

    stack = [spec["root"]["dag"]]
    while stack:
        for name, task in stack.pop()["tasks"].items():
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" in component:
                stack.append(component["dag"])
                continue
            for source in task.get("inputs", {}).get("artifacts", {}).values():
                ref = source.get("componentInputArtifact") or source["taskOutputArtifact"]["outputArtifactKey"]
                if "taskOutputArtifact" in source and not source["taskOutputArtifact"]["producerTask"].startswith(
                        "for-loop"):
                    ref = f"{source['taskOutputArtifact']['producerTask']}-{ref}"
                up, artifact = producer(ref)
                edges.setdefault((up, name), set()).add(artifact)
            for up in task.get("dependentTasks", []):
                if not up.startswith("for-loop"):
                    edges.setdefault((up, name), set()).add("after")
    # The compiler lists every input's producer as a dependency too: `after` only without one.
    return {edge: (what - {"after"} or what) for edge, what in edges.items()}


def test_the_pipeline_has_the_graph_of_dvc_yaml():
    dvc, kfp = _dvc_edges(), _kfp_edges()
    assert dvc <= set(kfp), f"dvc.yaml dependencies missing in the pipeline: {sorted(dvc - set(kfp))}"
    # The pipeline's other edges carry only the resolved params, which DVC stages read from params.yaml.
    extra = {edge: what for edge, what in kfp.items() if edge not in dvc}
    assert all(what == {"config"} for what in extra.values()), extra
    assert ("register", "promote") in dvc and ("zero-shot", "report") in dvc


def _component_function(name: str) -> ast.FunctionDef:
    tree = ast.parse((REPO / "components" / f"{name}.py").read_text())
    (function,) = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    decorator = ast.unparse(function.decorator_list[0])
    assert decorator.startswith("dsl.component(") and "install_kfp_package=False" in decorator
    assert "base_image=IMAGE" in decorator
    return function


@pytest.mark.parametrize("name", COMPONENTS)
def test_components_are_thin_adapters(name):
    function = _component_function(name)
    body = function.body[1:] if ast.get_docstring(function) else function.body
    lines = body[-1].end_lineno - body[0].lineno + 1
    assert lines <= MAX_BODY_LINES, f"components/{name}.py: {lines} lines of body; move logic into ferflow"
    calls = {ast.unparse(n.func) for n in ast.walk(function) if isinstance(n, ast.Call)}
    stage_calls = {c for c in calls if c.startswith("stages.")}
    # train runs through its launcher (in-process, or torchrun for several GPUs).
    via = {"train": "distributed.launch_train"}
    # fetch is the data stage a task may run before its own (train fetches its dataset).
    own = stage_calls - {"stages.fetch"} if name != "fetch" else stage_calls
    assert own == ({f"stages.{name}"} if name not in via else set()), stage_calls
    assert name not in via or via[name] in calls
    loops = [n for n in ast.walk(function) if isinstance(n, (ast.For, ast.While))]
    assert not loops and not calls & {"open", "shutil.copy", "shutil.copytree", "subprocess.run"}, \
        "loops and file handling belong in ferflow.pipeline (glue, artifacts)"
    imports = {a.name if isinstance(n, ast.Import) else n.module for n in ast.walk(function)
               if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert imports <= {"ferflow", "ferflow.pipeline", "ferflow.evaluation.evaluate", "json", "pathlib"}, imports


def test_every_component_is_in_the_pipeline():
    text = (REPO / "pipelines" / "ferflow_pipeline.py").read_text()
    for name in COMPONENTS:
        assert f"from components.{name} import {name}" in text
    compiled = json.dumps(yaml.safe_load((REPO / "pipelines" / "ferflow.yaml").read_text().split("\n---\n")[0]))
    for name in COMPONENTS:
        assert f"comp-{name.replace('_', '-')}" in compiled
