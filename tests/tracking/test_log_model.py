"""tracking.log_model: false means no model goes to MLflow, and a registered version is
such a model, so `register` refuses up front instead of logging it anyway."""

from pathlib import Path

import pytest

from ferflow import layout, stages
from ferflow.config import load_params
from ferflow.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _tree(root: Path) -> set:
    return set(root.rglob("*"))


def test_register_refuses_when_log_model_is_false(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(REPO / "params.yaml", [
        "tracking.log_model=false", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"train.out_dir={tmp_path / 'models'}", f"registry.records_dir={tmp_path / 'registry'}",
    ])
    run = layout.run_dir(params.require_train().out_dir, "LFW-FER", "demo_tiny")
    run.mkdir(parents=True)
    (run / layout.RUN_JSON).write_text('{"model": "demo_tiny", "input_size": 48, "classes": []}')
    (run / layout.WEIGHTS).write_bytes(b"")
    before = _tree(tmp_path)
    with pytest.raises(ConfigError, match=r"tracking\.log_model is false.*set tracking\.log_model=true"):
        stages.register(params, "LFW-FER", "demo_tiny")
    assert _tree(tmp_path) == before  # no store created, no registry record written
