"""`ferflow pipeline submit` against a local HTTP server that imitates enough of the KFP
v2beta1 API for kfp.Client (healthz, experiments, runs) and records what it receives."""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from . import REPO

BIN = Path(sys.executable).parent
TOKEN = "kfp-bearer-T0K3N-do-not-print"


class FakeKfp(BaseHTTPRequestHandler):
    requests: list = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, body: dict, status: int = 200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self, body=None):
        url = urlsplit(self.path)
        self.requests.append({"method": self.command, "path": url.path, "query": parse_qs(url.query),
                              "auth": self.headers.get("Authorization"), "body": body})

    def do_GET(self):
        self._record()
        path = urlsplit(self.path).path
        if path == "/apis/v2beta1/healthz":
            return self._reply({"multi_user": False})
        if path == "/apis/v2beta1/experiments":
            return self._reply({"experiments": [], "total_size": 0})
        self._reply({"error": "not found"}, 404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self._record(body)
        path = urlsplit(self.path).path
        if path == "/apis/v2beta1/experiments":
            return self._reply({"experiment_id": "exp-0001", "display_name": body.get("display_name")})
        if path == "/apis/v2beta1/runs":
            return self._reply({"run_id": "run-abc-123", "display_name": body.get("display_name"),
                                "experiment_id": body.get("experiment_id"), "state": "PENDING"})
        self._reply({"error": "not found"}, 404)


@pytest.fixture
def kfp_server():
    FakeKfp.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKfp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", FakeKfp.requests
    finally:
        server.shutdown()
        server.server_close()


def _ferflow(args, tmp_path, **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("KF_PIPELINES", "KFP_"))}
    full_env.update(HOME=str(tmp_path), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", **env)  # no ~/.config/kfp
    return subprocess.run([str(BIN / "ferflow"), *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=180)


def test_submit_sends_the_spec_and_the_parameters(kfp_server, tmp_path):
    host, requests = kfp_server
    done = _ferflow(["pipeline", "submit", "--host", host, "--experiment", "ferflow-ci", "--run-name", "ci-1",
                     "--set", "train.full_stage.epochs=2", "--set", "train.models=[demo_tiny]",
                     "--image", "registry.example/ferflow:ci"], tmp_path, KFP_EXISTING_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{host}/#/runs/details/run-abc-123"
    assert TOKEN not in done.stdout + done.stderr

    created = [r for r in requests if r["method"] == "POST" and r["path"] == "/apis/v2beta1/runs"]
    assert len(created) == 1
    run = created[0]["body"]
    assert run["display_name"] == "ci-1" and run["experiment_id"] == "exp-0001"
    spec = run["pipeline_spec"]["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "ferflow" and "exec-train" in spec["deploymentSpec"]["executors"]
    assert "kubernetes" in run["pipeline_spec"]["platform_spec"]["platforms"]
    assert spec["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"] == "registry.example/ferflow:ci"

    arguments = run["runtime_config"]["parameters"]
    assert arguments["overrides"] == ["train.full_stage.epochs=2", "train.models=[demo_tiny]"]
    assert arguments["models"] == ["demo_tiny"]
    assert arguments["matrix"] == [{"dataset": d, "model": "demo_tiny"} for d in arguments["datasets"]]
    assert arguments["archives"]["LFW-FER"]["sha256"].startswith("c93674d5")
    assert arguments["registered_models"]["LFW-FER"] == "ferflow-lfw-fer"

    experiments = [r for r in requests if r["path"] == "/apis/v2beta1/experiments" and r["method"] == "POST"]
    assert experiments[0]["body"]["display_name"] == "ferflow-ci"
    assert {r["auth"] for r in requests} == {f"Bearer {TOKEN}"}


def test_submit_fails_before_any_request_on_bad_params(kfp_server, tmp_path):
    host, requests = kfp_server
    done = _ferflow(["pipeline", "submit", "--host", host, "--set", "train.batch_size=many"], tmp_path)
    assert done.returncode == 2 and "train.batch_size" in done.stderr and "Traceback" not in done.stderr
    assert requests == []


def test_submit_names_the_host_when_nothing_answers(tmp_path):
    done = _ferflow(["pipeline", "submit", "--host", "http://127.0.0.1:9", "--token-env", "MY_KFP_TOKEN"], tmp_path,
                    MY_KFP_TOKEN=TOKEN)
    assert done.returncode == 1 and "http://127.0.0.1:9" in done.stderr and "Traceback" not in done.stderr
    assert TOKEN not in done.stdout + done.stderr


def test_token_sources(monkeypatch, tmp_path):
    from ferflow.errors import FerflowError
    from ferflow.pipeline.submit import auth_kwargs

    for key in ("KFP_EXISTING_TOKEN", "KF_PIPELINES_SA_TOKEN_PATH", "MY_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    assert auth_kwargs() == {}
    token_file = tmp_path / "token"
    token_file.write_text("sa-token")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    credentials = auth_kwargs()["credentials"]
    assert credentials._get_token() == "sa-token"
    monkeypatch.setenv("KFP_EXISTING_TOKEN", "from-env")
    assert auth_kwargs() == {"existing_token": "from-env"}
    with pytest.raises(FerflowError, match="MY_TOKEN"):
        auth_kwargs("MY_TOKEN")
    monkeypatch.setenv("MY_TOKEN", "mine")
    assert auth_kwargs("MY_TOKEN") == {"existing_token": "mine"}
