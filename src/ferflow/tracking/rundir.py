"""The files of a training run directory that tracking reads or adds (names: ferflow.layout).

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

from ferflow import layout
from ferflow.tracking.payload import number

log = logging.getLogger(__name__)


def read_run_dir(run_dir: Path) -> dict:
    """run.json of a finished training (its weights present), with the keys a logged model needs."""
    layout.trained_files(run_dir)
    return layout.read_run_info(run_dir, required=("model", "input_size", "classes"))


def train_metrics(run_dir: Path) -> dict:
    """The numeric entries of train_metrics.json; {} when it is missing or unreadable."""
    try:
        data = json.loads((Path(run_dir) / layout.TRAIN_METRICS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if number(v) is not None}


def read_run_ref(run_dir: Path) -> Optional[dict]:
    """`<run_dir>/mlflow_run.json` (the MLflow run a training wrote), or None."""
    path = Path(run_dir) / layout.MLFLOW_RUN
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

    atomic_write_json(Path(run_dir) / layout.MLFLOW_RUN, ref)
