"""Credentials inside an archive URI (userinfo and a presigned query) and in the environment
reach nothing ferflow writes: the whole CLI chain runs against a local HTTP server with such a
URI, then every file under the workspace (run records, reports, the sqlite store, every MLflow
artifact: model versions, model card, logged-model files, parent run), every line of output
(fetch with --verbose prints urllib3's request lines) and the compiled pipeline are searched."""

import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from ferflow import stages
from ferflow.config import load_params

REPO = Path(__file__).resolve().parents[2]
DS = "LFW-FER"

URI_USER, URI_PASSWORD = "alice", "pw-uri-3c1e8d-distinctive"
TOKEN, SIGNATURE = "tok-5a7f20-distinctive", "sig-91bd44-distinctive"
ENV_SECRETS = {
    "MLFLOW_TRACKING_PASSWORD": "pw-env-7f3a9c-distinctive",
    "AWS_SECRET_ACCESS_KEY": "aws-env-5e1b2d-distinctive",
    "AWS_SESSION_TOKEN": "session-env-0c6d3b-distinctive",
}
SECRETS = [URI_PASSWORD, TOKEN, SIGNATURE, *ENV_SECRETS.values()]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the server's own access log is not ferflow's output
        pass


@pytest.fixture
def archive_server(tmp_path):
    """Serves a folder over HTTP on a port the server bound itself (no race)."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, server.server_address[1]
    server.shutdown()
    server.server_close()


def _workspace(tmp_path: Path, root: Path, port: int) -> Path:
    ws = tmp_path / "ws"
    base = load_params(REPO / "params.yaml", [
        f"demo.out_dir={ws / 'archives'}", "demo.images_per_class=30", "demo.image_size=48", "demo.overrides=[]",
        "data.raw_dir=data/raw", "data.prepared_dir=data/prepared", "prepare.image_sizes=[48]",
        "prepare.workers=1", "fetch.progress=false", "train.out_dir=models", "evaluate.out_dir=evaluation",
        "report.out_dir=reports",
    ])
    params_file = ws / "params.yaml"
    stages.demo_data(base, params_out=params_file)
    tree = yaml.safe_load(params_file.read_text())
    spec = tree["data"]["archives"][DS]
    served = root / f"{DS}.zip"
    served.write_bytes(Path(spec["uri"]).read_bytes())
    spec["uri"] = (f"http://{URI_USER}:{URI_PASSWORD}@127.0.0.1:{port}/{DS}.zip"
                   f"?X-Amz-Algorithm=AWS4-HMAC-SHA256&token={TOKEN}&X-Amz-Signature={SIGNATURE}")
    tree["train"].update({"models": ["demo_tiny"], "datasets": [DS], "input_size": 48, "batch_size": 16,
                          "workers": 0, "threads": 1})
    tree["train"]["head_stage"]["epochs"] = 1
    tree["train"]["full_stage"]["epochs"] = 1
    tree["tracking"].update({"enabled": True, "tracking_uri": "sqlite:///mlruns/mlflow.db",
                             "log_system_metrics": False})
    params_file.write_text(yaml.safe_dump(tree, sort_keys=False))
    return ws


def test_uri_and_env_credentials_reach_no_output_file_or_store(tmp_path, archive_server):
    root, port = archive_server
    ws = _workspace(tmp_path, root, port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(ENV_SECRETS, PYTHONUNBUFFERED="1")
    ferflow = [sys.executable, "-m", "ferflow.cli"]
    chain = " && ".join([
        f"{sys.executable} -m ferflow.cli train -d {DS} -m demo_tiny",
        f"{sys.executable} -m ferflow.cli evaluate -d {DS} -m demo_tiny --on {DS}",
        f"{sys.executable} -m ferflow.cli register -d {DS} -m demo_tiny",
        f"{sys.executable} -m ferflow.cli promote -d {DS} --force",
        f"{sys.executable} -m ferflow.cli report",
    ])
    steps = [
        [*ferflow, "fetch", "--verbose"],
        [*ferflow, "prepare", "-d", DS],
        [*ferflow, "parent-run", "--name", "scan", "--", "bash", "-c", chain],
        [*ferflow, "pipeline", "compile", "-o", str(ws / "compiled.yaml"), "--no-dvc", "--repo", str(REPO)],
    ]
    outputs = []
    for cmd in steps:
        done = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=900)
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, f"{cmd}:\n{outputs[-1][-3000:]}"

    # the verbose fetch did log the request line, masked, and the archive came over HTTP
    fetch_log = outputs[0]
    assert "GET /LFW-FER.zip?" in fetch_log and "token=***" in fetch_log, fetch_log[-2000:]
    assert (ws / "data/raw" / f"{DS}.zip").is_file()
    # everything but the input itself: the params file the user wrote the URI into
    written = [p for p in ws.rglob("*") if p.is_file() and p != ws / "params.yaml"]
    names = {p.name for p in written}
    # the scan covers what it claims: the store, run records, reports, model files, the model
    # card and the compiled pipeline are all among the files searched
    for expected in ("mlflow.db", "run.json", "report.json", "MLmodel", "model.onnx", "compiled.yaml"):
        assert expected in names, expected
    db = (ws / "mlruns/mlflow.db").read_bytes()  # versions' tags and model cards live in the store
    assert b"`demo_tiny` fine-tuned on LFW-FER" in db
    leaks = [(secret, str(p)) for p in written for secret in SECRETS if secret.encode() in p.read_bytes()]
    leaks += [(secret, f"output of step {i}") for i, text in enumerate(outputs) for secret in SECRETS if secret in text]
    assert not leaks, leaks
    # where the data came from stays known: the masked URI is recorded
    report = (ws / "data/prepared" / DS / "report.json").read_text()
    assert f"http://***@127.0.0.1:{port}/{DS}.zip?X-Amz-Algorithm=AWS4-HMAC-SHA256&token=***" in report
