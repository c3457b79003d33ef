"""Compile the KFP pipeline to YAML.

Two inputs: `CompileOptions` (cluster settings: image, GPUs, resources, node selector,
Kubernetes secret names, retries, timeouts) and `PipelineDefaults`, read from the checkout
being compiled: params.yaml as the base params, the `fetch@*` entries of dvc.lock and the
DVC remote of `.dvc/config`. The defaults become the pipeline parameters' defaults, so a
run started with no arguments trains on the config and data of the compiled commit.

The pipeline itself is defined in the checkout's `pipelines/ferflow_pipeline.py` (beside
`components/`), which this module loads by path: the package never imports components.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import yaml

from ferflow.config import apply_override, parse_override, read_yaml, validate
from ferflow.data.digests import with_recorded_digests
from ferflow.errors import FerflowError
from ferflow.fileio import atomic_path
from ferflow.redact import redact_tree, redact_uri
from ferflow.pipeline import configured_image
from ferflow.pipeline.glue import matrix

PIPELINE_FILE = Path("pipelines/ferflow_pipeline.py")
DEFAULT_OUT = Path("pipelines/ferflow.yaml")
DVC_CONFIG = Path(".dvc/config")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileOptions:
    """Cluster settings baked into the compiled YAML (none of them a secret value)."""

    image: str = field(default_factory=configured_image)
    gpus: int = 1
    accelerator: str = "nvidia.com/gpu"
    train_cpu_request: str = "4"
    train_cpu_limit: str = "8"
    train_memory_request: str = "16Gi"
    train_memory_limit: str = "32Gi"
    # NCCL and PyTorch's shared-memory tensors need more than the container's 64 MiB default.
    shm_size: str = "8Gi"
    node_selector: tuple[tuple[str, str], ...] = ()
    # Kubernetes Secret names; their keys are the env names (MLFLOW_TRACKING_URI, ...). "" = none.
    mlflow_secret: str = "ferflow-mlflow"
    s3_secret: str = "ferflow-s3"
    fetch_retries: int = 3
    fetch_backoff: str = "60s"
    fetch_backoff_factor: float = 2.0
    # The other data tasks (fetch, evaluate, zero-shot): they decode images on these CPUs.
    task_cpu_request: str = "4"
    task_cpu_limit: str = "8"
    task_memory_request: str = "8Gi"
    task_memory_limit: str = "16Gi"
    # StorageClass of the tasks' work volumes (generic ephemeral volumes); "" = the default.
    work_storage_class: str = ""
    train_timeout_s: int = 24 * 3600
    task_timeout_s: int = 4 * 3600
    # GPUs the run may hold at once (the namespace's quota); with `parallelism` 0 the
    # concurrent trainings are gpu_quota // gpus, so no pod waits on a GPU it cannot get.
    gpu_quota: int = 8
    parallelism: int = 0  # concurrent (dataset, model) iterations; 0 = from gpu_quota

    def __post_init__(self) -> None:
        if self.gpus < 0:
            raise FerflowError(f"--gpus {self.gpus}: must be 0 or more")
        if self.parallelism < 0:
            raise FerflowError(f"--parallelism {self.parallelism}: must be 0 (from --gpu-quota) or more")
        if self.gpus and self.gpu_quota < self.gpus:
            raise FerflowError(f"--gpu-quota {self.gpu_quota}: smaller than --gpus {self.gpus}; no training "
                               "could ever be scheduled")

    @property
    def concurrent_trainings(self) -> int:
        """The ParallelFor's parallelism: explicit, else what the GPU quota allows (CPU
        training: 0, no limit)."""
        if self.parallelism:
            return self.parallelism
        return self.gpu_quota // self.gpus if self.gpus else 0


@dataclass(frozen=True)
class PipelineDefaults:
    """The pipeline parameters' defaults: what a run uses when started without arguments."""

    base_params: str
    archives: dict
    datasets: list
    models: list
    matrix: list
    experiment: str
    registered_models: dict
    dvc_lock: dict = field(default_factory=dict)
    dvc_remote: str = ""

    @classmethod
    def from_checkout(
        cls,
        repo: Path = Path("."),
        params_file: Optional[Path] = None,
        dvc_lock: Optional[Path] = Path("dvc.lock"),
        dvc_remote: Optional[str] = None,
        overrides: Sequence[str] = (),
    ) -> "PipelineDefaults":
        """params.yaml with `overrides` (--set) applied, validated; dvc.lock's fetch entries
        (absent file: no pinning; None: pinning off) and the DVC remote (`dvc_remote`, else
        `.dvc/config`'s default)."""
        repo = Path(repo)
        params_path = Path(params_file) if params_file else repo / "params.yaml"
        tree = read_yaml(params_path)
        # Applied to the file's own tree, not dumped from Params: the base params stay the
        # keys the file (and --set) gives, without every default spelled out.
        for text in overrides:
            keys, value = parse_override(text)
            apply_override(tree, keys, value, origin=f"--set {'.'.join(keys)}")
        params = validate(tree, origin=str(params_path))
        # A local source without sha256 goes in with the digest its fetch recorded: the
        # pipeline's tasks can only check, and fetch by, a pinned digest.
        params = with_recorded_digests(params, params.data.archives)
        train = params.require_train()
        # The compiled file is committed and shared: URIs go in with their credentials masked
        # (a masked archive URI fails its fetch with a message saying how to pass the real one).
        base = _redacted(tree, params_path)
        archives = redact_tree({n: src.model_dump(mode="json", exclude_none=True)
                                for n, src in params.data.archives.items()})
        return cls(
            # One line of JSON (valid YAML): KFP 2.17 writes string defaults into the YAML's
            # comment header verbatim, and a multi-line one breaks the file; a struct
            # default cannot hold the file's nulls.
            base_params=json.dumps(base, separators=(",", ":")),
            archives=archives,
            datasets=list(train.datasets),
            models=list(train.models),
            matrix=matrix(train.datasets, train.models),
            experiment=params.tracking.experiment,
            registered_models=dict(params.registry.names),
            dvc_lock=read_dvc_lock(dvc_lock if dvc_lock is None or dvc_lock.is_absolute() else repo / dvc_lock,
                                   params.data.specs),
            dvc_remote=dvc_remote if dvc_remote is not None else read_dvc_remote(repo),
        )


def _redacted(tree: dict, origin: Path) -> dict:
    clean = redact_tree(tree)
    masked = [key.lstrip(".") for key in _changed(tree, clean, "")]
    if masked:
        log.warning("%s: credentials in %s were masked in the compiled pipeline; pass those URIs at run time "
                    "(pipeline parameters) or serve the archives from the DVC remote", origin, ", ".join(masked))
    return clean


def _changed(before, after, key: str):
    """Dotted keys whose values differ between two trees of the same shape."""
    if isinstance(before, dict):
        for name, value in before.items():
            yield from _changed(value, after[name], f"{key}.{name}")
    elif isinstance(before, list):
        for i, (old, new) in enumerate(zip(before, after)):
            yield from _changed(old, new, f"{key}.{i}")
    elif before != after:
        yield key


def read_dvc_lock(path: Optional[Path], specs=None) -> dict:
    """The archive pins of a dvc.lock ({} when there is none); with `specs` (the archives
    being compiled), only those that hold for them, the stale ones named in a warning."""
    from ferflow.data.dvc_remote import fetch_entries, read_pins

    if path is None or not Path(path).is_file():
        return {}
    entries = fetch_entries(Path(path), specs)
    if specs is not None:
        kept = {stage.split("@", 1)[1] for stage in entries.get("stages", {})}
        stale = sorted(set(read_pins(Path(path))) & {s.name for s in specs} - kept)
        if stale:
            log.warning("%s: the pins of %s were recorded for other archives than params.yaml gives, so the "
                        "pipeline will not pin them; run `dvc repro` and commit dvc.lock first", path,
                        ", ".join(stale))
    return entries


def read_dvc_remote(repo: Path) -> str:
    """The default remote's URL from the project's `.dvc/config`.

    `.dvc/config.local` is left out on purpose: it is per-developer (and may hold
    credentials), while the compiled YAML is committed; pass --dvc-remote instead.
    """
    from configobj import ConfigObj, ConfigObjError

    path = Path(repo) / DVC_CONFIG
    if not path.is_file():
        return ""
    try:
        config = ConfigObj(str(path))
    except ConfigObjError as exc:
        raise FerflowError(f"{path}: not a DVC config ({exc})") from None
    name = (config.get("core") or {}).get("remote", "")
    url = str((config.get(f'remote "{name}"') or {}).get("url", "")) if name else ""
    # A credential is whatever ferflow.redact masks: userinfo, token/signature/key query values.
    if redact_uri(url) != url:
        raise FerflowError(f"{path}: the URL of remote {name!r} holds credentials, which must not reach the "
                           "compiled pipeline; remove them or pass --dvc-remote")
    return url


# ---------------------------------------------------------------------------- compile

Builder = Callable[[CompileOptions, PipelineDefaults], object]


def load_builder(repo: Path = Path(".")) -> Builder:
    """`build` from the checkout's pipelines/ferflow_pipeline.py."""
    path = Path(repo).resolve() / PIPELINE_FILE
    if not path.is_file():
        raise FerflowError(f"{path} not found: compile from a ferflow checkout (or pass --repo)")
    module_spec = importlib.util.spec_from_file_location("ferflow_pipeline", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.build


def compile_pipeline(
    out: Path = DEFAULT_OUT,
    options: Optional[CompileOptions] = None,
    defaults: Optional[PipelineDefaults] = None,
    repo: Path = Path("."),
    build: Optional[Builder] = None,
) -> Path:
    """Write the pipeline YAML to `out` (atomically) and return its path."""
    from kfp import compiler

    options = options or CompileOptions()
    defaults = defaults or PipelineDefaults.from_checkout(repo)
    pipeline = (build or load_builder(repo))(options, defaults)
    out = Path(out)
    with atomic_path(out, suffix=".yaml") as tmp:  # the compiler wants a .yaml name
        compiler.Compiler().compile(pipeline, package_path=str(tmp))
        tmp.write_text(_stable_header(tmp.read_text(encoding="utf-8")), encoding="utf-8")
    return out


_HEADER_INPUT = re.compile(r"^(#\s+)([\w-]+): (\w+) \[Default: .*\]$")


def _stable_header(text: str) -> str:
    """KFP writes dict defaults into the comment header in protobuf map order, which
    changes with the process's hash seed; rewrite them as sorted JSON so that compiling
    the same commit twice gives the same file (the spec itself is already sorted)."""
    defaults = next(yaml.safe_load_all(text))["root"]["inputDefinitions"]["parameters"]
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.startswith("#"):
            break
        match = _HEADER_INPUT.match(line)
        if match and "defaultValue" in defaults.get(match.group(2), {}):
            value = json.dumps(defaults[match.group(2)]["defaultValue"], sort_keys=True)
            lines[i] = f"{match.group(1)}{match.group(2)}: {match.group(3)} [Default: {value}]"
    return "\n".join(lines)


def load_compiled(path: Path) -> tuple[dict, dict]:
    """(pipeline spec, platform spec) of a compiled YAML; the second document holds the
    kfp-kubernetes settings (`platforms.kubernetes`)."""
    docs = list(yaml.safe_load_all(Path(path).read_text(encoding="utf-8")))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def parse_node_selector(items: Optional[list[str]]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FerflowError(f"--node-selector {item!r}: expected label=value")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)
