"""`mlflow models serve` of the registered champion (`models:/<name>@champion`), offline,
as a real process: REST scoring with base64 images, and a clear 400 for a bad row."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import mlflow
import pytest
from PIL import Image, ImageDraw

from conftest import start_on_free_port, stop_group, wait_ready
from ferflow import fileio
from ferflow.config import load_params
from ferflow.labels import CLASSES
from ferflow.models import zoo
from ferflow.tracking import aliases, versioning
from ferflow.training import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DATASET, MODEL, SIZE = "LFW-FER", "demo_tiny", 48

pytestmark = pytest.mark.slow


def fabricated_run(root: Path, uri: str):
    """A run directory and evaluation as `train` / `evaluate` / `prepare` leave them, with
    random demo_tiny weights: serving needs a registered model, not a good one."""
    params = load_params(REPO / "params.yaml", [
        f"data.prepared_dir={root / 'prepared'}", f"evaluate.out_dir={root / 'evaluation'}",
        f"train.out_dir={root / 'models'}", f"tracking.tracking_uri={uri}",
        f"tracking.experiment=serve-{uuid.uuid4().hex[:8]}",
        f"registry.names.{DATASET}=ferflow-serve-{uuid.uuid4().hex[:8]}",
    ])
    entry = zoo.resolve(MODEL)
    run_dir = root / "models" / DATASET / MODEL
    run_dir.mkdir(parents=True)
    ckpt.save_weights(run_dir / "best.safetensors", zoo.build_model(entry, num_classes=len(CLASSES)).state_dict(),
                      {"format": "ferflow-3class"})
    fileio.atomic_write_json(run_dir / "run.json", {
        "model": MODEL, "arch": entry.arch, "input_size": SIZE, "classes": list(CLASSES), "dataset": DATASET,
        "recipe_hash": "0" * 16, "weights_source": "none", "weights_sha256": None})
    report = root / "prepared" / DATASET / "report.json"
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps({"manifest_sha256": "a" * 64}))
    evaluation = root / "evaluation" / "fine-tuned" / DATASET
    evaluation.mkdir(parents=True)
    (evaluation / f"{MODEL}.json").write_text(json.dumps({DATASET: {"accuracy": 0.5, "macro_f1": 0.4, "n": 30}}))
    return params, run_dir


def face_jpeg() -> bytes:
    img = Image.new("RGB", (250, 250), (120, 110, 100))
    draw = ImageDraw.Draw(img)
    draw.ellipse((60, 40, 190, 210), fill=(220, 180, 150))
    draw.arc((90, 120, 160, 170), 20, 160, fill=(90, 20, 20), width=6)  # a smile
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_serve_champion_over_rest(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    mlflow.set_tracking_uri(mlflow_server.uri)
    try:
        params, run_dir = fabricated_run(tmp_path, mlflow_server.uri)
        name = params.registry.name_for(DATASET)
        versioning.register(params, DATASET, run_dir)
        assert aliases.promote(params, name).action == "promoted"
    finally:
        mlflow.set_tracking_uri(None)

    # No AWS variables: the server proxies the artifacts (--serve-artifacts); uvicorn is
    # started by name, so the venv's bin goes first on PATH (shared/design/FACTS.md).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update({"MLFLOW_TRACKING_URI": mlflow_server.uri, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"})
    log = tmp_path / "serve.log"

    def start(port: int) -> subprocess.Popen:
        with open(log, "wb") as fh:
            return subprocess.Popen(
                [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local",
                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True,
            )

    # Started again on another port if the picked one is taken before uvicorn binds it.
    port, proc = start_on_free_port(start, lambda port, proc: wait_ready(f"http://127.0.0.1:{port}/ping", proc, log),
                                    log, stop=stop_group)
    try:
        base = f"http://127.0.0.1:{port}"
        image = base64.b64encode(face_jpeg()).decode("ascii")

        status, body = post(f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": [[image], [image]]}})
        assert status == 200, body
        predictions = body["predictions"]
        assert len(predictions) == 2
        for row in predictions:
            assert row["label"] in CLASSES
            probs = [row[f"p_{c}"] for c in CLASSES]
            assert abs(sum(probs) - 1.0) < 1e-6 and all(0.0 <= p <= 1.0 for p in probs)
            assert row["label"] == CLASSES[probs.index(max(probs))]

        status, body = post(f"{base}/invocations", {"dataframe_records": [{"image": image}]})
        assert status == 200 and body["predictions"][0] == predictions[0], body

        status, body = post(f"{base}/invocations", {"dataframe_records": [{"image": image}, {"image": "bm90IGFuIGltYWdl"}]})
        assert status == 400, body
        assert "row 1" in body["message"] and "cannot decode image" in body["message"], body

        # The server's own files are not readable through the model.
        status, body = post(f"{base}/invocations", {"dataframe_records": [{"path": str(log)}]})
        assert status == 400 and "'path' inputs are off" in body["message"], body
    finally:
        stop_group(proc)
