"""Conventions every `ferflow` command keeps, sub-apps (`pipeline`, `serve`) included:
--params, --set and --verbose; flags shown as flags; a --set example that fits the command;
a row in the README's CLI table. Walks the click tree, so a new command is covered."""

import re
from pathlib import Path

import pytest
import typer
from rich.text import Text
from typer.testing import CliRunner

from ferflow.cli import app
from ferflow.config import load_params, read_yaml
from ferflow.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# They use no params value: --params/--set are checked when given, and not read otherwise.
USES_NO_PARAMS = {"pipeline image-tag", "serve validate"}


def _commands(command, path=()):
    """(path, command) for the root, every group and every leaf."""
    yield " ".join(path), command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = dict(_commands(typer.main.get_command(app)))
LEAVES = {path: command for path, command in COMMANDS.items() if not hasattr(command, "commands")}


def _option(command, flag: str):
    return next((p for p in command.params if flag in p.opts), None)


def _set_example(command) -> str:
    """The key=value that --set's help gives, as the help shows it (the help is rich markup)."""
    match = re.search(r"--set (\S+)", Text.from_markup(_option(command, "--set").help).plain)
    assert match, f"--set help has no example: {_option(command, '--set').help!r}"
    return match.group(1)


def test_the_tree_is_walked():
    assert {"fetch", "train", "parent-run", "pipeline compile", "pipeline trainjob", "serve manifest"} <= set(LEAVES)


@pytest.mark.parametrize("path", sorted(LEAVES))
def test_every_command_takes_params_set_and_verbose(path):
    command = LEAVES[path]
    assert _option(command, "--verbose") is not None, f"ferflow {path}: no --verbose"
    for flag in ("--params", "--set"):
        assert _option(command, flag) is not None, f"ferflow {path}: no {flag}"


def test_commands_that_use_no_params_check_them_only_when_given(tmp_path, monkeypatch):
    runner = CliRunner()
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: many\n")
    manifest = tmp_path / "isvc.yaml"
    manifest.write_text("")  # no InferenceService: its own error, not a params one
    monkeypatch.chdir(tmp_path)  # outside the checkout, beside a broken params.yaml
    for path, args in (("pipeline image-tag", []), ("serve validate", [str(manifest)])):
        assert path in USES_NO_PARAMS
        argv = [*path.split(), *args]
        plain = runner.invoke(app, argv)  # params not read unless asked
        assert plain.exit_code == 0 if path == "pipeline image-tag" else "no InferenceService" in str(plain.exception)
        for extra in (["--params", str(bad)], ["--set", "seed=-1", "--params", str(REPO / "params.yaml")]):
            result = runner.invoke(app, [*argv, *extra])
            # The runner bypasses run_app, so the error arrives as the exception (exit 2 there).
            assert isinstance(result.exception, ConfigError) and "seed" in str(result.exception), (path, extra)


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_flags_take_no_value_and_show_none(path):
    for param in COMMANDS[path].params:
        if isinstance(param.default, bool):
            assert param.is_flag, f"ferflow {path} {param.opts}: a bool option must be a flag"
    result = CliRunner().invoke(app, [*path.split(), "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--help" in result.output  # the options table was rendered
    assert "<bool>" not in result.output, result.output


def test_verbose_is_a_flag_at_the_root_too():
    result = CliRunner().invoke(app, ["--verbose", "--version"])
    assert result.exit_code == 0 and result.output.startswith("ferflow "), result.output


def test_set_examples_name_real_keys_and_fit_each_command():
    examples = {path: _set_example(command) for path, command in LEAVES.items() }
    tree = read_yaml(REPO / "params.yaml")
    for path, example in examples.items():
        node = tree
        for part in example.partition("=")[0].split("."):
            assert isinstance(node, (dict, list)), f"ferflow {path}: --set {example}: no such key in params.yaml"
            node = node[int(part)] if isinstance(node, list) else node.get(part, KeyError)
            assert node is not KeyError, f"ferflow {path}: --set {example}: no such key in params.yaml"
        load_params(REPO / "params.yaml", [example])  # and a value the key takes
    shared = {e for e in examples.values() if list(examples.values()).count(e) > 1}
    assert not shared, f"--set examples copied between commands: {shared}"


def test_every_command_is_in_the_readme_table():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## The CLI", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| `ferflow ")]
    for path in LEAVES:
        assert any(re.match(rf"`ferflow {re.escape(path)}[ `]", row) for row in rows), \
            f"README.md's CLI table has no row for ferflow {path}"


def test_compile_set_overrides_the_base_params_it_compiles_in():
    """`pipeline compile --set` is no ignored option: it changes the pipeline's defaults."""
    import json

    from ferflow.pipeline.spec import PipelineDefaults

    defaults = PipelineDefaults.from_checkout(REPO, overrides=["train.models=[demo_tiny]", "fetch.retries=7"])
    base = json.loads(defaults.base_params)
    assert defaults.models == ["demo_tiny"] and base["train"]["models"] == ["demo_tiny"]
    assert base["fetch"]["retries"] == 7
    assert base["seed"] == read_yaml(REPO / "params.yaml")["seed"]  # the rest as the file has it
