"""The single place that sets MLflow up: tracking and registry URI, bounded HTTP behaviour,
the experiment. Jobs never call `mlflow.set_tracking_uri` themselves.

Where runs go: `MLFLOW_TRACKING_URI` when set, else `tracking.tracking_uri` (default
`sqlite:///mlruns/mlflow.db`, relative to the working directory, artifacts under
`tracking.artifact_location`; a new sqlite store is created once, under `<db>.lock`, however
many jobs open it together). Credentials come only from MLflow's standard variables
(MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN, AWS_*) and are never printed or logged:
every URI or error text that leaves this package goes through `ferflow.redact`.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Union
from urllib.parse import urlsplit

from ferflow.config import Params, TrackingSettings
from ferflow.errors import FerflowError
from ferflow.redact import install_log_filter, redact_text, redact_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

log = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# Small fixed backoff: with max_retries=2 a refused connection fails in ~2 s, a hung server
# in about (max_retries + 1) * timeout_s; MLflow's defaults (7 retries, factor 2, 120 s
# timeout) can stall a job for many minutes.
_BACKOFF_FACTOR = "1"
_BACKOFF_JITTER = "0.5"

# set_tracking_uri also exports MLFLOW_TRACKING_URI "so that subprocesses inherit it": a
# value we wrote from params must not later pass for the user's choice in this process.
_state: dict = {"written_uri": None, "written_from_env": False, "experiment_id": None}
# sqlite stores whose schema this process has created or checked (under their lock).
_initialised: set = set()
# Creating a fresh store runs all of MLflow's migrations: seconds, more on a slow disk.
_INIT_LOCK_TIMEOUT_S = 300.0

SettingsLike = Union[Params, TrackingSettings]


def _settings(settings: SettingsLike) -> TrackingSettings:
    return settings.tracking if isinstance(settings, Params) else settings


# ---------------------------------------------------------------------------- URIs


def resolve_tracking_uri(settings: SettingsLike) -> str:
    """MLFLOW_TRACKING_URI wins over `tracking.tracking_uri` (unless MLflow itself wrote it)."""
    env = os.environ.get(TRACKING_URI_ENV, "").strip()
    if env and (env != _state["written_uri"] or _state["written_from_env"]):
        return env
    return _settings(settings).tracking_uri


def is_http(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


def is_local_store(uri: str) -> bool:
    """sqlite or file stores: the client writes artifacts itself, so we choose where."""
    scheme = urlsplit(uri).scheme.lower()
    return scheme in ("sqlite", "file", "")


_SQLITE = "sqlite:///"


def _sqlite_parts(uri: str) -> Optional[tuple[Path, str]]:
    """(database path as written, "?query" or "") of a `sqlite:///` file URI; None for
    other stores and in-memory databases."""
    if not uri.startswith(_SQLITE):
        return None
    path_part, sep, query = uri[len(_SQLITE):].partition("?")
    return None if path_part in ("", ":memory:") else (Path(path_part), sep + query)


def _absolute_sqlite(uri: str) -> str:
    """`sqlite:///rel/db` -> `sqlite:////abs/rel/db` with its folder created.

    Absolute, so that subprocesses (which inherit MLFLOW_TRACKING_URI) and a later chdir
    reach the same database.
    """
    parts = _sqlite_parts(uri)
    if parts is None:
        return uri
    path, query = parts
    path = path if path.is_absolute() else Path.cwd() / path
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"{_SQLITE}{path.as_posix()}{query}"


def _sqlite_file(uri: str) -> Optional[Path]:
    """The database file of an absolute `sqlite:////abs/db` URI; None for anything else."""
    parts = _sqlite_parts(uri)
    return parts[0] if parts is not None and parts[0].is_absolute() else None


def store_lock_path(uri: str, purpose: str) -> Optional[Path]:
    """`<db>.<purpose>`: a lock file beside the database of an embedded sqlite store, for
    work that jobs sharing it must not interleave; None for servers and other stores,
    which a local file lock cannot guard."""
    db = _sqlite_file(uri)
    return None if db is None else db.with_name(f"{db.name}.{purpose}")


@contextmanager
def store_lock(purpose: str, what: str, timeout_s: float) -> Iterator[None]:
    """Hold `store_lock_path(<current store>, purpose)` while the block runs: jobs sharing
    one embedded sqlite store take turns. No lock for servers (none spans hosts): callers
    that need one there re-check after writing instead."""
    from ferflow.locks import file_lock

    path = store_lock_path(current_tracking_uri() or "", purpose)
    if path is None:
        yield
        return
    with file_lock(path, what, timeout_s):
        yield


def _init_sqlite_store(uri: str, settings: TrackingSettings) -> None:
    """Create (or check) the schema of an embedded sqlite store once, under `<db>.lock`.

    MLflow migrates an empty database on first use without any lock, so two jobs started
    together on a fresh store both run alembic and one dies (`table ... already exists`).
    Here the first job migrates while the others wait; they then find the schema at head
    and MLflow's own store only checks it.
    """
    db, lock = _sqlite_file(uri), store_lock_path(uri, "lock")
    if db is None or lock is None or uri in _initialised:
        return
    if db.exists() and not os.access(db.parent, os.W_OK):
        return  # a read-only copy of a store: no lock possible, and nothing to migrate
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from ferflow.locks import file_lock

    # Experiment 0 (made with the schema) keeps its artifacts beside ferflow's experiments.
    artifact_root = _artifact_location(settings)
    with file_lock(lock, f"creating the MLflow store {redact_uri(uri)}", _INIT_LOCK_TIMEOUT_S):
        SqlAlchemyStore(uri, artifact_root)
    _initialised.add(uri)


def _artifact_location(settings: TrackingSettings) -> str:
    loc = settings.artifact_location
    if "://" in loc:
        return loc
    path = Path(loc)
    path = path if path.is_absolute() else Path.cwd() / path
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


# ---------------------------------------------------------------------------- reachability


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """One quick GET /health for http(s) stores; raise FerflowError when nothing answers.

    MLflow's own client retries a refused connection with backoff; this fails in at most
    `timeout` seconds, before any compute starts. Local stores are always "reachable".
    """
    if not is_http(uri):
        return
    import requests

    url = uri.rstrip("/") + "/health"
    verify: Union[bool, str] = True
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        verify = False
    elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        verify = os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    try:
        resp = requests.get(url, timeout=timeout, verify=verify)
    except requests.RequestException as exc:
        raise _unreachable(uri, type(exc).__name__) from None
    # 401/403/404 mean something answers (auth proxies may hide /health); MLflow's own calls
    # report those precisely. A 5xx is a server that is up but broken.
    if resp.status_code >= 500:
        raise _unreachable(uri, f"HTTP {resp.status_code} from /health")


def _unreachable(uri: str, why: str) -> FerflowError:
    return FerflowError(
        f"MLflow tracking server {redact_uri(uri)} is not reachable ({why}); start it, fix "
        "MLFLOW_TRACKING_URI, or set tracking.enabled=false"
    )


# ---------------------------------------------------------------------------- configure


def _bound_http(settings: TrackingSettings) -> None:
    """MLflow reads these on every request (mlflow/environment_variables.py, rest_utils)."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(settings.timeout_s)))  # int-typed knob
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(settings.max_retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = _BACKOFF_FACTOR
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] = _BACKOFF_JITTER


def configure(settings: SettingsLike) -> "MlflowClient":
    """Point MLflow (tracking + registry) at the resolved store, create the experiment if
    missing, make it the active one, and return a client for it.

    Raises FerflowError (URI redacted) when the store cannot be reached or refuses us.
    """
    import mlflow
    from mlflow import MlflowClient

    install_log_filter()  # MLflow's own handler (it does not propagate) prints run URLs
    cfg = _settings(settings)
    uri = resolve_tracking_uri(cfg)
    from_env = uri == os.environ.get(TRACKING_URI_ENV, "").strip()
    _bound_http(cfg)
    check_reachable(uri, min(cfg.timeout_s, 5.0))
    if uri.startswith("sqlite:"):
        uri = _absolute_sqlite(uri)
        try:
            _init_sqlite_store(uri, cfg)  # before any MLflow client opens the file
        except FerflowError:
            raise
        except Exception as exc:  # MlflowException (old schema), sqlalchemy errors
            raise FerflowError(
                f"MLflow store {redact_uri(uri)} could not be opened: {redact_text(_short(exc))}"
            ) from None
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    _state.update(written_uri=uri, written_from_env=from_env)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        experiment_id = _ensure_experiment(client, cfg, uri)
        mlflow.set_experiment(experiment_id=experiment_id)
    except FerflowError:
        raise
    except Exception as exc:  # MlflowException, requests errors, sqlalchemy errors
        raise FerflowError(
            f"MLflow at {redact_uri(uri)} failed while opening experiment {cfg.experiment!r}: "
            f"{redact_text(_short(exc))}; check the URI and MLFLOW_TRACKING_* credentials, or set "
            "tracking.enabled=false"
        ) from None
    _state["experiment_id"] = experiment_id
    log.debug("MLflow tracking at %s, experiment %s (%s)", redact_uri(uri), cfg.experiment, experiment_id)
    return client


def connect(settings: SettingsLike, retry_hint: str = "") -> "MlflowClient":
    """`configure`, its failure message followed by `retry_hint` (what to re-run once the
    store is back): the registry commands' entry point."""
    try:
        return configure(settings)
    except FerflowError as exc:
        raise FerflowError(f"{exc}{retry_hint}") from None


@contextmanager
def mlflow_errors(what: str, retry_hint: str = "", where: Optional[str] = None) -> Iterator[None]:
    """MLflow and HTTP failures in the block become one FerflowError naming the (redacted)
    store: `where`, else the tracking URI in use."""
    import mlflow
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except FerflowError:
        raise
    except (MlflowException, requests.RequestException, OSError) as exc:
        message = " ".join((getattr(exc, "message", None) or str(exc)).split())[:500]
        raise FerflowError(
            f"{what} failed at {where or redact_uri(mlflow.get_tracking_uri())}: {redact_text(message)}{retry_hint}"
        ) from exc


def not_found(exc: "MlflowException") -> bool:
    """Whether MLflow refused because the run, model or version does not exist."""
    return getattr(exc, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def _ensure_experiment(client: "MlflowClient", cfg: TrackingSettings, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        location = _artifact_location(cfg) if is_local_store(uri) else None
        try:
            return client.create_experiment(cfg.experiment, artifact_location=location)
        except MlflowException as exc:
            # Another job (a parallel DAG branch) created it in between.
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(cfg.experiment)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise FerflowError(
            f"MLflow experiment {cfg.experiment!r} is deleted in {redact_uri(uri)}; restore it "
            f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or set tracking.experiment"
        )
    return exp.experiment_id


def current_experiment_id() -> Optional[str]:
    """The experiment the last `configure` opened (None before any)."""
    return _state["experiment_id"]


def current_tracking_uri() -> Optional[str]:
    """The URI the last `configure` set (absolute for sqlite); None before any."""
    return _state["written_uri"]


def _short(exc: BaseException, limit: int = 400) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:limit]


def describe_error(exc: BaseException) -> str:
    """A one-line, redacted description of an MLflow failure, for warnings and errors."""
    return redact_text(f"{type(exc).__name__}: {_short(exc)}")


def reset() -> None:
    """Forget what `configure` set (URIs, exported variables, active experiment): for tests
    and long-lived processes that switch stores."""
    import mlflow
    import mlflow.tracking.fluent as fluent

    written = _state["written_uri"]
    mlflow.set_tracking_uri(None)  # also unsets the MLFLOW_TRACKING_URI MLflow exported
    mlflow.set_registry_uri(None)
    if written and os.environ.get("MLFLOW_REGISTRY_URI") == written:
        os.environ.pop("MLFLOW_REGISTRY_URI")
    fluent._active_experiment_id = None  # set by mlflow.set_experiment; no public reset
    _state.update(written_uri=None, written_from_env=False, experiment_id=None)
    _initialised.clear()
