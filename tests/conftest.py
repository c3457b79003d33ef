"""Shared fixtures: real service processes on 127.0.0.1, started and stopped by the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
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
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, proc)
        yield S3Server(port, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


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
    port = free_port()
    s3.make_bucket(bucket)
    env = {
        **os.environ, **s3.env(),
        "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
        # Without this the server starts ~9 processes (~2 GB); 2 are enough for tests.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = root / "mlflow-server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", f"s3://{bucket}/artifacts", "--serve-artifacts", "--workers", "1"],
            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=root,
        )
    try:
        wait_for_port(port, proc, timeout=60)
        _wait_http_ok(f"http://127.0.0.1:{port}/health", proc)
    except Exception:
        stop_process(proc)
        raise RuntimeError(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
    return MlflowServer(port, proc, root, log)


def _wait_http_ok(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} not healthy after {timeout}s")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server):
    """One tracking server for the session (start-up costs seconds); tests use own experiments."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), s3_server, "ferflow-mlflow")
    try:
        yield server
    finally:
        stop_process(server.proc)
