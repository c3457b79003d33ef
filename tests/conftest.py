"""Shared fixtures: real service processes on 127.0.0.1, started and stopped by the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
# Large shared inputs (checkpoints, stand-in archives) sit beside the checkout, not at a fixed
# absolute path, so a checkout anywhere finds them (or skips with the path it looked at).
SHARED = REPO.parent / "shared"

# Readiness waits poll and return at once when the service answers; the limits only bound a
# hang, generously, because start-up on a busy 2-core CI machine can take tens of seconds.
READY_TIMEOUT_S = 180.0
PORT_ATTEMPTS = 5


# ------------------------------------------------------------------------------- ports


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A local port on which connections are refused, for as long as the block runs.

    The socket stays bound but never listens: the kernel answers connects with a reset, and
    no other process can take the port meanwhile (a port picked and released could be)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def refused_port() -> Iterator[int]:
    with closed_port() as port:
        yield port


def _candidate_port() -> int:
    # Released before the server binds it, so another process can take it in between:
    # only start_on_free_port uses it, which starts again on another port when that happens.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortTaken(RuntimeError):
    """The server could not bind its port (someone else holds it)."""


def _says_port_taken(log: Path) -> bool:
    text = log.read_text(errors="replace").lower() if log.is_file() else ""
    # uvicorn: "[Errno 98] ... address already in use"; moto (werkzeug): "Address already in use"
    return "address already in use" in text or "errno 98" in text


def listens_on(proc: subprocess.Popen, port: int) -> bool:
    """Whether `proc` or one of its children (uvicorn under `mlflow server`) listens on `port`:
    a connect alone could reach another program that took the port first."""
    try:
        root = psutil.Process(proc.pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for p in family:
        try:
            conns = p.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
            return True
    return False


def start_on_free_port(start: Callable[[int], subprocess.Popen], ready: Callable[[int, subprocess.Popen], None],
                       log: Path, stop: Callable[[subprocess.Popen], None] | None = None,
                       attempts: int = PORT_ATTEMPTS) -> tuple[int, subprocess.Popen]:
    """(port, process) of a server that `start(port)` launches (its output going to `log`)
    and `ready(port, proc)` waits for. An external server cannot bind port 0 and tell us the
    port, so a port can be taken between picking and binding it: the server then exits
    saying so, or another program answers there, and we start again on another port."""
    stop = stop or stop_process
    why = ""
    for _ in range(attempts):
        port = _candidate_port()
        proc = start(port)
        try:
            ready(port, proc)
        except Exception:
            exited = proc.poll() is not None
            stop(proc)
            if not (exited and _says_port_taken(log)):
                raise
            why = f"port {port} was taken before the server bound it"
            continue
        if listens_on(proc, port):
            return port, proc
        stop(proc)  # what answered is not ours; ours fails to bind and would exit
        why = f"another program answered on port {port}"
    raise PortTaken(f"no port after {attempts} attempts; last: {why}")


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"service on port {port} not ready after {timeout}s")


class S3Server:
    """moto's S3 API server as a real process; env() gives what boto3/DVC need to reach it."""

    def __init__(self, port: int, proc: subprocess.Popen):
        self.port = port
        self.proc = proc
        self.endpoint = f"http://127.0.0.1:{port}"
        # Dummy credentials: moto accepts any; real ones never appear in tests.
        self.access_key = "ferflow-test-key"
        self.secret_key = "ferflow-test-secret-do-not-log"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("moto") / "moto.log"

    def start(port: int) -> subprocess.Popen:
        with open(log, "wb") as fh:
            return subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                    stdout=fh, stderr=subprocess.STDOUT)

    port, proc = start_on_free_port(start, wait_for_port, log)
    try:
        yield S3Server(port, proc)
    finally:
        stop_process(proc)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point boto3 (and anything using the standard AWS variables) at the local S3 server."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


class MlflowServer:
    """A real `mlflow server` process: sqlite backend, artifacts proxied to the S3 server."""

    def __init__(self, port: int, proc: subprocess.Popen, root: Path, log: Path):
        self.port, self.proc, self.root, self.log = port, proc, root, log
        self.uri = f"http://127.0.0.1:{port}"


def start_mlflow_server(root: Path, s3: S3Server, bucket: str) -> MlflowServer:
    s3.make_bucket(bucket)
    env = {
        **os.environ, **s3.env(),
        "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
        # Without this the server starts ~9 processes (~2 GB); 2 are enough for tests.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = root / "mlflow-server.log"

    def start(port: int) -> subprocess.Popen:
        with open(log, "wb") as fh:
            return subprocess.Popen(
                [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                 "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                 "--artifacts-destination", f"s3://{bucket}/artifacts", "--serve-artifacts", "--workers", "1"],
                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=root,
            )

    def ready(port: int, proc: subprocess.Popen) -> None:
        wait_for_port(port, proc)
        wait_ready(f"http://127.0.0.1:{port}/health", proc, log)

    try:
        port, proc = start_on_free_port(start, ready, log)
    except Exception as exc:
        raise RuntimeError(f"mlflow server did not start ({exc}):\n{log.read_text()[-3000:]}") from exc
    return MlflowServer(port, proc, root, log)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = READY_TIMEOUT_S) -> None:
    """Until `url` answers 200; the server's log tail in the error if it exits or never does.
    No proxy: every server here is on 127.0.0.1."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with opener.open(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_group(proc: subprocess.Popen) -> None:
    """A server started in a session of its own (`start_new_session=True`) with the workers it
    forks (mlflow models serve's uvicorn): stop them together."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server):
    """One tracking server for the session (start-up costs seconds); tests use own experiments."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), s3_server, "ferflow-mlflow")
    try:
        yield server
    finally:
        stop_process(server.proc)
