"""Submit a pipeline run to a Kubeflow Pipelines API server with `kfp.Client`.

The run's params are resolved and validated here first (params file + `--set`, as every
ferflow command does), so a typo fails on the laptop rather than in the cluster's first
task. The run receives the structured parameters derived from them plus the `--set`
strings as `overrides`; the fetch task resolves the same document again from those.

Authentication, in the order KFP's own tools use: a token in the variable named by
`--token-env`, else KFP_EXISTING_TOKEN, else the projected service-account token file
named by KF_PIPELINES_SA_TOKEN_PATH (in-cluster), else none (port-forward, no auth).
Tokens are sent as a bearer header and never printed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from ferflow.config import load_params
from ferflow.errors import FerflowError
from ferflow.pipeline.glue import matrix
from ferflow.pipeline.spec import CompileOptions, PipelineDefaults, compile_pipeline

TOKEN_ENV = "KFP_EXISTING_TOKEN"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # kfp.client.KF_PIPELINES_SA_TOKEN_ENV
UI_ENV = "KF_PIPELINES_UI_ENDPOINT"  # what kfp.Client uses for links, when the UI is elsewhere


@dataclass(frozen=True)
class SubmittedRun:
    run_id: str
    url: str
    experiment: str


def run_arguments(params_file: Path, overrides: Iterable[str]) -> dict:
    """Pipeline arguments for a run of `params_file` + overrides (validated here)."""
    overrides = list(overrides)
    params = load_params(params_file, overrides)
    train = params.require_train()
    return {
        "archives": {n: s.model_dump(mode="json", exclude_none=True) for n, s in params.data.archives.items()},
        "datasets": list(train.datasets),
        "models": list(train.models),
        "matrix": matrix(train.datasets, train.models),
        "experiment": params.tracking.experiment,
        "registered_models": dict(params.registry.names),
        "overrides": overrides,
    }


def auth_kwargs(token_env: Optional[str] = None) -> dict:
    """kfp.Client keyword arguments for the credentials found in the environment."""
    if token_env:
        token = os.environ.get(token_env, "").strip()
        if not token:
            raise FerflowError(f"--token-env {token_env}: that environment variable is not set or empty")
        return {"existing_token": token}
    if os.environ.get(TOKEN_ENV, "").strip():
        return {"existing_token": os.environ[TOKEN_ENV].strip()}
    if os.environ.get(SA_TOKEN_PATH_ENV, "").strip():
        from kfp.client import ServiceAccountTokenVolumeCredentials

        return {"credentials": ServiceAccountTokenVolumeCredentials(os.environ[SA_TOKEN_PATH_ENV].strip())}
    return {}


def submit(
    host: str,
    *,
    params_file: Path = Path("params.yaml"),
    overrides: Iterable[str] = (),
    namespace: Optional[str] = None,
    experiment: Optional[str] = None,
    run_name: Optional[str] = None,
    token_env: Optional[str] = None,
    package: Optional[Path] = None,
    options: Optional[CompileOptions] = None,
    repo: Path = Path("."),
) -> SubmittedRun:
    """Create a run of the pipeline (`package`, else compiled now from `repo` with
    `params_file` as its base params) and return its id and UI link."""
    import kfp

    arguments = run_arguments(params_file, overrides)
    experiment = experiment or arguments["experiment"]  # KFP experiment named like MLflow's
    auth = auth_kwargs(token_env)
    with tempfile.TemporaryDirectory(prefix="ferflow-submit-") as tmp:
        if package is None:
            defaults = PipelineDefaults.from_checkout(repo, params_file=params_file)
            package = compile_pipeline(Path(tmp) / "ferflow.yaml", options or CompileOptions(), defaults, repo)
        elif not Path(package).is_file():
            raise FerflowError(f"--package {package}: no such file; compile one with `ferflow pipeline compile`")
        try:
            # kfp.Client prints links and progress: keep stdout for our one line.
            with contextlib.redirect_stdout(sys.stderr):
                client = kfp.Client(host=host, namespace=namespace or "kubeflow", **auth)
                result = client.create_run_from_pipeline_package(
                    str(package), arguments=arguments, run_name=run_name, experiment_name=experiment,
                    namespace=namespace,
                )
        except FerflowError:
            raise
        except Exception as exc:  # kfp_server_api / urllib3 / auth errors: one line, host named
            raise FerflowError(
                f"Kubeflow Pipelines at {host} refused or did not answer ({_describe(exc)}); check --host, "
                f"--namespace and the token (--token-env, {TOKEN_ENV} or {SA_TOKEN_PATH_ENV})"
            ) from None
    ui = os.environ.get(UI_ENV, "").strip() or host
    return SubmittedRun(result.run_id, f"{ui.rstrip('/')}/#/runs/details/{result.run_id}", experiment)


def _describe(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status:
        return f"HTTP {status} {reason or ''}".strip()
    return type(exc).__name__
