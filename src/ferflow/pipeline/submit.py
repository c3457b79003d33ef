"""Submit the pipeline to a Kubeflow Pipelines API server with `kfp.Client`.

The run's params are resolved and validated here first (params file + `--set`, as every
ferflow command does), so a typo fails on the laptop rather than in the cluster's first
task. The run receives the structured parameters derived from them plus the `--set`
strings as `overrides`; the fetch task resolves the same document again from those.

What is submitted is a pipeline *version*, so the cluster keeps every pipeline that ran:
the pipeline (`--pipeline-name`) is uploaded on first use, then one version per commit of
the checkout (`git_version`), or per content hash of a `--package` file. A version whose
name exists is reused when its content is the same (`same_content`), so resubmitting a
commit uploads nothing; a commit compiled with other options gets `<name>-<content hash>`.
The run, or with a cron schedule a recurring run, starts from that version in the
experiment (created when missing).

Authentication, in the order KFP's own tools use: a token in the variable named by
`--token-env`, else KFP_EXISTING_TOKEN, else the projected service-account token file
named by KF_PIPELINES_SA_TOKEN_PATH (in-cluster), else none (port-forward, no auth).
Tokens are sent as a bearer header and never printed.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import yaml

from ferflow.config import load_params
from ferflow.data.digests import with_recorded_digests
from ferflow.errors import FerflowError
from ferflow.pipeline.glue import matrix
from ferflow.pipeline.spec import CompileOptions, PipelineDefaults, compile_pipeline

TOKEN_ENV = "KFP_EXISTING_TOKEN"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # kfp.client.KF_PIPELINES_SA_TOKEN_ENV
UI_ENV = "KF_PIPELINES_UI_ENDPOINT"  # what kfp.Client uses for links, when the UI is elsewhere
DEFAULT_PIPELINE = "ferflow"
MAX_CONCURRENCY = 10  # the API server rejects recurring runs outside 1..10

# KFP's cron (robfig/cron): second minute hour day-of-month month day-of-week. Month and
# weekday fields may use names (JAN, MON-FRI).
_CRON_FIELDS = ("second", "minute", "hour", "day-of-month", "month", "day-of-week")
_CRON_NUMERIC = re.compile(r"^[0-9*?/,-]+$")
_CRON_NAMED = re.compile(r"^[0-9A-Za-z*?/,-]+$")
_FILTER_EQUALS = 1  # kfp.client's _FILTER_OPERATIONS['EQUALS']


@dataclass(frozen=True)
class SubmittedRun:
    run_id: str  # the run's id, or the recurring run's with a schedule
    url: str
    experiment: str
    pipeline_id: str = ""
    version_id: str = ""
    version_name: str = ""
    version_reused: bool = False
    schedule: Optional[str] = None


@dataclass(frozen=True)
class _Upload:
    """The compiled YAML to upload, what names its version and how to recognise it."""

    path: Path
    docs: list  # its YAML documents: pipeline spec, then platform spec
    digest: str  # sha256 of the file
    version_name: str
    description: str


def run_arguments(params_file: Path, overrides: Iterable[str]) -> dict:
    """Pipeline arguments for a run of `params_file` + overrides (validated here)."""
    overrides = list(overrides)
    # Local sources without sha256 are passed with the digest their fetch recorded.
    params = with_recorded_digests(load_params(params_file, overrides), [])
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


def cron_problem(expression: str) -> Optional[str]:
    """What is wrong with `expression` as a KFP cron (6 fields, seconds first); None if nothing."""
    fields = expression.split()
    if len(fields) != 6:
        return (f"KFP cron has 6 fields, seconds first ({' '.join(_CRON_FIELDS)}), e.g. '0 0 3 * * *' for "
                f"03:00 every day; got {len(fields)}")
    for i, (name, value) in enumerate(zip(_CRON_FIELDS, fields)):
        if not (_CRON_NAMED if i >= 4 else _CRON_NUMERIC).match(value):
            return f"the {name} field {value!r} may hold only digits, * ? / , -{' and names' if i >= 4 else ''}"
    return None


def validate_cron(expression: str) -> str:
    """`expression`, normalised, when it is a KFP cron; else a FerflowError naming --schedule."""
    problem = cron_problem(expression)
    if problem:
        raise FerflowError(f"--schedule {expression!r}: {problem}")
    return " ".join(expression.split())


# ---------------------------------------------------------------------------- naming

def _git(repo: Path, *args: str) -> Optional[bytes]:
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def git_version(repo: Path) -> Optional[tuple[str, str]]:
    """(version name, what it names) for the checkout at `repo`: the commit's 12-hex
    prefix (fixed length, so every clone names a commit the same), plus `-dirty-<hash of
    the diff>` when tracked files differ from HEAD, so two different dirty trees never
    share a name. None outside a git checkout."""
    head = _git(repo, "rev-parse", "--verify", "HEAD")
    if head is None:
        return None
    commit = head.decode().strip()
    if _git(repo, "status", "--porcelain", "--untracked-files=no") == b"":  # None (failed): not known clean
        return commit[:12], f"commit {commit}"
    diff = _git(repo, "diff", "--binary", "--no-color", "--no-ext-diff", "HEAD") or b""
    digest = hashlib.sha256(diff).hexdigest()[:8]
    return f"{commit[:12]}-dirty-{digest}", f"commit {commit} plus uncommitted changes (diff sha256 {digest})"


def _package_image(docs: list) -> str:
    """The `image` parameter's default in a compiled package ('' when it has none)."""
    parameters = (docs[0].get("root") or {}).get("inputDefinitions", {}).get("parameters", {}) if docs else {}
    return str(parameters.get("image", {}).get("defaultValue", ""))


def same_content(version, digest: str, docs: list) -> bool:
    """Whether an existing version holds this package: the content hash our description
    records, else the spec the API returns (a multi-document package comes back as
    {pipeline_spec, platform_spec}, see the API server's YamlStringToPipelineSpecStruct)."""
    if f"sha256 {digest}" in (version.description or ""):
        return True
    spec = version.pipeline_spec
    if not isinstance(spec, dict) or not docs:
        return False
    if "pipeline_spec" in spec:
        return spec["pipeline_spec"] == docs[0] and spec.get("platform_spec") == (docs[1] if len(docs) > 1 else None)
    return len(docs) == 1 and spec == docs[0]


# ---------------------------------------------------------------------------- submit

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
    pipeline_name: str = DEFAULT_PIPELINE,
    schedule: Optional[str] = None,
    schedule_name: Optional[str] = None,
    max_concurrency: int = 1,
    catchup: bool = False,
) -> SubmittedRun:
    """Upload the pipeline (`package`, else compiled now from `repo` with `params_file` as
    its base params) as a version of `pipeline_name` and start a run of it, or a recurring
    run with a `schedule`; return its id and UI link."""
    if schedule is not None:
        schedule = validate_cron(schedule)
        if not 1 <= max_concurrency <= MAX_CONCURRENCY:
            raise FerflowError(f"--max-concurrency {max_concurrency}: must be 1 to {MAX_CONCURRENCY}")
    if not pipeline_name.strip():
        raise FerflowError("--pipeline-name: must not be empty")
    arguments = run_arguments(params_file, overrides)
    experiment = experiment or arguments["experiment"]  # KFP experiment named like MLflow's
    auth = auth_kwargs(token_env)

    with tempfile.TemporaryDirectory(prefix="ferflow-submit-") as tmp:
        if package is None:
            defaults = PipelineDefaults.from_checkout(repo, params_file=params_file)
            package = compile_pipeline(Path(tmp) / "ferflow.yaml", options or CompileOptions(), defaults, repo)
            named = git_version(Path(repo))
        elif not Path(package).is_file():
            raise FerflowError(f"--package {package}: no such file; compile one with `ferflow pipeline compile`")
        elif Path(package).suffix not in (".yaml", ".yml"):  # the API server goes by the file name's suffix
            raise FerflowError(f"--package {package}: expected a .yaml file, as `ferflow pipeline compile` writes")
        else:
            named = None
        content = Path(package).read_bytes()
        digest = hashlib.sha256(content).hexdigest()
        try:
            docs = [d for d in yaml.safe_load_all(content) if d is not None]
        except yaml.YAMLError:
            raise FerflowError(f"--package {package}: not a compiled pipeline YAML") from None
        if named is None:  # a given file, or a checkout without git: its content names it
            named = (f"sha256-{digest[:12]}", f"package {Path(package).name}")
        upload = _Upload(Path(package), docs, digest, named[0],
                         f"ferflow {named[1]}; image {_package_image(docs) or 'unknown'}; sha256 {digest}")
        try:
            # kfp.Client prints links and progress: keep stdout for our one line.
            with contextlib.redirect_stdout(sys.stderr):
                result = _submit(
                    host, namespace, auth, upload, pipeline_name=pipeline_name, experiment=experiment,
                    arguments=arguments, run_name=run_name, schedule=schedule, schedule_name=schedule_name,
                    max_concurrency=max_concurrency, catchup=catchup,
                )
        except FerflowError:
            raise
        except Exception as exc:  # kfp_server_api / urllib3 / auth errors: one line, host named
            raise FerflowError(
                f"Kubeflow Pipelines at {host} refused or did not answer ({_describe(exc)}); check --host, "
                f"--namespace and the token (--token-env, {TOKEN_ENV} or {SA_TOKEN_PATH_ENV})"
            ) from None
    return result


def _submit(host: str, namespace: Optional[str], auth: dict, upload: _Upload, *, pipeline_name: str, experiment: str,
            arguments: dict, run_name: Optional[str], schedule: Optional[str], schedule_name: Optional[str],
            max_concurrency: int, catchup: bool) -> SubmittedRun:
    import kfp

    client = kfp.Client(host=host, namespace=namespace or "kubeflow", **auth)
    experiment_id = client.create_experiment(name=experiment, namespace=namespace).experiment_id
    pipeline_id = _pipeline_id(client, host, upload.path, pipeline_name, namespace)
    version, reused = _version(client, host, upload, pipeline_id, pipeline_name)
    ui = (os.environ.get(UI_ENV, "").strip() or host).rstrip("/")
    common = dict(experiment=experiment, pipeline_id=pipeline_id, version_id=version.pipeline_version_id,
                  version_name=version.display_name or upload.version_name, version_reused=reused)
    if schedule is None:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H-%M-%S")
        run = client.run_pipeline(
            experiment_id=experiment_id, job_name=run_name or f"{pipeline_name} {common['version_name']} {stamp}",
            params=arguments, pipeline_id=pipeline_id, version_id=version.pipeline_version_id,
        )
        return SubmittedRun(run.run_id, f"{ui}/#/runs/details/{run.run_id}", **common)
    recurring = client.create_recurring_run(
        experiment_id=experiment_id, job_name=schedule_name or f"{pipeline_name} {common['version_name']}",
        description=f"{upload.description}; cron {schedule}", cron_expression=schedule, max_concurrency=max_concurrency,
        no_catchup=not catchup, params=arguments, pipeline_id=pipeline_id, version_id=version.pipeline_version_id,
    )
    rid = recurring.recurring_run_id
    return SubmittedRun(rid, f"{ui}/#/recurringrun/details/{rid}", schedule=schedule, **common)


def _name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": _FILTER_EQUALS, "key": "display_name", "stringValue": name}]})


def _find_pipeline(client, host: str, name: str, namespace: Optional[str]) -> Optional[str]:
    listed = client.list_pipelines(filter=_name_filter(name), namespace=namespace, page_size=2)
    found = [p for p in listed.pipelines or [] if p.display_name == name]
    if len(found) > 1:
        raise FerflowError(f"Kubeflow Pipelines at {host} has {len(found)} pipelines named {name!r}; "
                           "pass --pipeline-name with a unique name")
    return found[0].pipeline_id if found else None


def _pipeline_id(client, host: str, package: Path, name: str, namespace: Optional[str]) -> str:
    """The pipeline named `name`, uploaded from `package` when there is none yet."""
    from kfp_server_api.exceptions import ApiException

    found = _find_pipeline(client, host, name, namespace)
    if found:
        return found
    try:
        return client.upload_pipeline(
            str(package), pipeline_name=name, namespace=namespace,
            description="ferflow: fetch, then train, evaluate and register every (dataset, model), zero-shot "
                        "baselines, promote per dataset; versions are named by git commit",
        ).pipeline_id
    except ApiException as exc:
        if exc.status != 409:  # 409: uploaded by someone else since we looked
            raise
    found = _find_pipeline(client, host, name, namespace)
    if not found:
        raise FerflowError(f"Kubeflow Pipelines at {host}: pipeline {name!r} exists (HTTP 409) but is not listed; "
                           "check --namespace")
    return found


def _find_version(client, pipeline_id: str, name: str):
    listed = client.list_pipeline_versions(pipeline_id, filter=_name_filter(name), page_size=2)
    return next((v for v in listed.pipeline_versions or [] if v.display_name == name), None)


def _version(client, host: str, upload: _Upload, pipeline_id: str, pipeline_name: str):
    """(version, reused): the version named `upload.version_name` when it holds this
    package, else a new upload; a same-named version with other content (the commit
    compiled with other options) sends it to `<name>-<content hash>`, reused the same way."""
    from kfp_server_api.exceptions import ApiException

    name, digest = upload.version_name, upload.digest
    candidates = [name] if name.endswith(digest[:12]) else [name, f"{name}-{digest[:8]}"]
    for candidate in candidates:
        found = _find_version(client, pipeline_id, candidate)
        if found is None:
            try:
                return client.upload_pipeline_version(
                    str(upload.path), pipeline_version_name=candidate, pipeline_id=pipeline_id,
                    description=upload.description,
                ), False
            except ApiException as exc:
                if exc.status != 409:  # 409: the same name uploaded since we looked
                    raise
            found = _find_version(client, pipeline_id, candidate)
            if found is None:
                raise FerflowError(f"Kubeflow Pipelines at {host}: version {candidate!r} of pipeline "
                                   f"{pipeline_name!r} exists (HTTP 409) but is not listed")
        if same_content(found, digest, upload.docs):
            return found, True
    raise FerflowError(f"Kubeflow Pipelines at {host}: pipeline {pipeline_name!r} already has versions "
                       f"{' and '.join(map(repr, candidates))} with other content; pass another --pipeline-name")


def _describe(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status:
        return f"HTTP {status} {reason or ''}".strip()
    if isinstance(exc, ValueError):  # kfp.Client's own checks (e.g. two experiments of that name)
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__
