"""Reading params: the YAML file, `--set` overrides, validation into Params with one
readable error naming each bad key, and the plain form written back to files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import ValidationError

from ferflow.config.params import Params
from ferflow.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.0.c=value` -> (['a','b','0','c'], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value is not valid YAML: {exc}") from None
    return key.split("."), value


def apply_override(tree: dict, path: list[str], value: Any, origin: str) -> None:
    """Set `value` at `path` inside nested dicts/lists; list items are addressed by index."""
    node: Any = tree
    for depth, part in enumerate(path[:-1]):
        here = ".".join(path[: depth + 1])
        if isinstance(node, list):
            node = node[_index(part, node, here, origin)]
        elif isinstance(node, dict):
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"{origin}: {here} is a {type(node).__name__}, cannot set a key below it")
    last = path[-1]
    if isinstance(node, list):
        node[_index(last, node, ".".join(path), origin)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{origin}: {'.'.join(path[:-1])} is not a mapping")


def _index(part: str, seq: list, key: str, origin: str) -> int:
    if not part.isdigit() or int(part) >= len(seq):
        raise ConfigError(f"{origin}: {key}: list index must be 0..{len(seq) - 1}")
    return int(part)


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"params file not found: {path} (pass --params FILE)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                          "save the params file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read params file {path}: {exc.strerror or exc}") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(tree).__name__}")
    return tree


def validate(tree: dict, origin: str) -> Params:
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, origin)) from None


def load_params(path: Path | str = DEFAULT_PARAMS, overrides: Iterable[str] = ()) -> Params:
    """Read, override and validate params; raise ConfigError naming the key on any problem."""
    path = Path(path)
    tree = read_yaml(path)
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(tree, keys, value, origin=f"--set {'.'.join(keys)}")
    return validate(tree, origin=str(path))


def describe_validation_error(exc: ValidationError, origin: str) -> str:
    """One readable line per problem: `file: key.path: what was expected (got X)`."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see params.yaml for the known keys)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"]
            if "input" in err and not isinstance(err["input"], (dict, list)):
                msg += f" (got {err['input']!r})"
        lines.append(f"{origin}: {key}: {msg}")
    return "; ".join(lines)


def dump_params(params: Params) -> dict:
    """Plain-YAML form of resolved params (paths as strings), for writing files."""
    return params.model_dump(mode="json")
