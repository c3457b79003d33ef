"""The files of a training run directory that tracking reads or adds.

    run.json             what was trained (written by training): model, input size, classes
    best.safetensors     the weights a logged model carries
    train_metrics.json   the training's summary metrics
    mlflow_run.json      the MLflow run of that training (`runs.MlflowTrainCallback` writes it),
                         so evaluation and registration attach to the same run from any process
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from ferflow.errors import FerflowError
from ferflow.tracking.payload import number

log = logging.getLogger(__name__)

# Names as ferflow.training writes them (kept here so that reading a run needs no torch).
RUN_JSON, WEIGHTS, TRAIN_METRICS = "run.json", "best.safetensors", "train_metrics.json"
MLFLOW_RUN_FILE = "mlflow_run.json"


def read_run_dir(run_dir: Path) -> dict:
    """run.json of a finished training (its weights present), with the keys a logged model needs."""
    run_dir = Path(run_dir)
    info_path, weights = run_dir / RUN_JSON, run_dir / WEIGHTS
    if not info_path.is_file() or not weights.is_file():
        raise FerflowError(f"{run_dir}: no trained model ({RUN_JSON} / {WEIGHTS} missing); run `ferflow train` first")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise FerflowError(f"{info_path}: not valid JSON ({exc}); re-run `ferflow train`") from None
    missing = [k for k in ("model", "input_size", "classes") if k not in info]
    if missing:
        raise FerflowError(f"{info_path}: missing {', '.join(missing)}; written by an older ferflow? re-run `ferflow train`")
    return info


def train_metrics(run_dir: Path) -> dict:
    """The numeric entries of train_metrics.json; {} when it is missing or unreadable."""
    try:
        data = json.loads((Path(run_dir) / TRAIN_METRICS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if number(v) is not None}


def read_run_ref(run_dir: Path) -> Optional[dict]:
    """`<run_dir>/mlflow_run.json` (the MLflow run a training wrote), or None."""
    path = Path(run_dir) / MLFLOW_RUN_FILE
    try:
        ref = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s); ignoring it", path, exc)
        return None
    return ref if isinstance(ref, dict) and ref.get("run_id") else None


def recorded_run_id(run_dir: Path) -> Optional[str]:
    """The id of the MLflow run of training recorded in the run directory, if any."""
    ref = read_run_ref(Path(run_dir))
    return str(ref["run_id"]) if ref else None


def write_run_ref(run_dir: Path, ref: dict) -> None:
    from ferflow.fileio import atomic_write_json  # creates the run directory when missing

    atomic_write_json(Path(run_dir) / MLFLOW_RUN_FILE, ref)
