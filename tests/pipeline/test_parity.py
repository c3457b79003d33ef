"""dvc.yaml and the KFP components run the same ferflow entry points.

Both sides are observed, not assumed: each dvc.yaml command goes through the real CLI
and each component function runs for real, with every `ferflow.stages` function replaced
by a recorder that stops at the first call. Statically, each component calls exactly one
stage function and stays a short adapter (no second implementation of a stage)."""

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

COMPONENTS = ("fetch", "prepare", "train", "evaluate", "register", "promote", "report")
STAGE_FUNCTIONS = ("fetch", "prepare", "demo_data", "train", "evaluate", "zero_shot", "report", "register", "promote")
MAX_BODY_LINES = 20  # statements after the docstring: an adapter, not an implementation
DATASET, MODEL = "LFW-FER", "demo_tiny"


class Reached(Exception):
    """Raised by the recorder in place of a stage function."""


@pytest.fixture
def recorded(monkeypatch):
    calls = []

    def recorder(name):
        def stage(*args, **kwargs):
            calls.append(name)
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
        "dataset": DATASET, "model_name": MODEL, "run_id": "run-1",
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
    with pytest.raises(Reached):
        _component(name).python_func(**kwargs)
    assert len(calls) == 1, (name, calls)
    return calls[0]


def test_dvc_stages_and_components_call_the_same_stage_functions(recorded, tmp_path):
    via_dvc = {name: _cli_stage(cmd, recorded) for name, cmd in _dvc_commands().items()}
    for name in ("fetch", "prepare", "train", "evaluate", "report"):
        assert via_dvc[name] == name, (name, via_dvc[name])
    assert via_dvc["zero-shot"] == "zero_shot"
    assert via_dvc["prepare-union"] == "prepare"  # a union is prepared like any dataset
    via_kfp = {}
    for name in COMPONENTS:
        (tmp_path / name).mkdir()
        via_kfp[name] = _run_component(name, tmp_path / name, recorded)
    for name, function in via_kfp.items():
        # The same pipeline stage on both sides; a component without a dvc.yaml stage
        # calls the stage function of its own name (the one its CLI command would call).
        assert function == via_dvc.get(name, name), name
    # The dvc stages without a component: the zero-shot baseline row of the report, and
    # unions, which the prepare component's dataset list does not hold.
    assert set(via_dvc) - set(via_kfp) == {"zero-shot", "prepare-union"}


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
    assert stage_calls == {f"stages.{name}"}, stage_calls
    loops = [n for n in ast.walk(function) if isinstance(n, (ast.For, ast.While))]
    assert not loops and not calls & {"open", "shutil.copy", "shutil.copytree", "subprocess.run"}, \
        "loops and file handling belong in ferflow.pipeline.glue"
    imports = {a.name if isinstance(n, ast.Import) else n.module for n in ast.walk(function)
               if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert imports <= {"ferflow", "ferflow.pipeline", "ferflow.data.dvc_remote", "json"}, imports


def test_every_component_is_in_the_pipeline():
    text = (REPO / "pipelines" / "ferflow_pipeline.py").read_text()
    for name in COMPONENTS:
        assert f"from components.{name} import {name}" in text
    compiled = json.dumps(yaml.safe_load((REPO / "pipelines" / "ferflow.yaml").read_text().split("\n---\n")[0]))
    for name in COMPONENTS:
        assert f"comp-{name}" in compiled
