"""A small prepared demo dataset and params for training tests (built once per session)."""

import json
from pathlib import Path

import pytest
import yaml

from ferflow import stages
from ferflow.config import load_params

REPO = Path(__file__).resolve().parents[2]

TRAIN_OVERRIDES = [
    "train.models=[demo_tiny]",
    "train.datasets=[LFW-FER]",
    "train.input_size=48",
    "train.batch_size=32",
    "train.head_stage.epochs=1",
    "train.full_stage.epochs=3",
    "train.full_stage.lr=0.002",
    "train.workers=0",
    "train.threads=1",
    "train.early_stopping_patience=0",
    "tracking.enabled=false",  # tests of training alone; tests/tracking turn it on
]


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory):
    """A workspace with demo archives fetched and prepared at 32 px; returns its params file."""
    ws = tmp_path_factory.mktemp("train-ws")
    base = load_params(REPO / "params.yaml", [
        f"demo.out_dir={ws / 'archives'}", "demo.images_per_class=600", "demo.image_size=48",
        f"data.raw_dir={ws / 'data/raw'}", f"data.prepared_dir={ws / 'data/prepared'}",
        "prepare.image_sizes=[48]", "prepare.workers=1", "fetch.progress=false",
        f"train.out_dir={ws / 'models'}", f"evaluate.out_dir={ws / 'evaluation'}", f"report.out_dir={ws / 'reports'}",
        "demo.overrides=[]",
    ])
    params_file = ws / "params.yaml"
    stages.demo_data(base, params_out=params_file)
    params = load_params(params_file)
    stages.fetch(params)
    stages.prepare(params)
    return params_file


def load(params_file, *extra):
    return load_params(params_file, TRAIN_OVERRIDES + list(extra))


def read_json(path):
    return json.loads(Path(path).read_text())


def write_params(path, params_file, *extra):
    """A params file with TRAIN_OVERRIDES (+ extra) applied, for subprocess runs."""
    tree = load(params_file, *extra).model_dump(mode="json")
    Path(path).write_text(yaml.safe_dump(tree))
    return path
