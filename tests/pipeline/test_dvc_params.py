"""dvc.yaml's `params:` name only what changes a stage's result (issue 9): the train stage
follows the trainer's recipe hash, and the evaluation stages list what they read."""

from pathlib import Path

import yaml

from ferflow.config import Params, TrainSettings
from ferflow.training.trainer import NOT_RECIPE_KEYS

REPO = Path(__file__).resolve().parents[2]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def stage(name: str) -> dict:
    body = STAGES[name]
    return body.get("do", body)


def test_train_params_are_the_recipe_keys():
    listed = set(stage("train")["params"])
    recipe = {f"train.{k}" for k in TrainSettings.model_fields if k not in NOT_RECIPE_KEYS}
    assert listed == recipe | {"seed", "models"}
    assert not {"train", "train.workers", "train.threads", "train.cpu_keep_freed_memory"} & listed


def test_every_listed_param_exists_in_params_yaml():
    tree = Params.model_validate(yaml.safe_load((REPO / "params.yaml").read_text())).model_dump(mode="json")
    for name, body in STAGES.items():
        for key in (body.get("do", body)).get("params", []):
            node = tree
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"dvc.yaml stage {name}: params key {key} not in params"
                node = node[part]


def test_evaluation_stages_list_what_they_read():
    for name in ("evaluate", "zero-shot"):
        listed = set(stage(name)["params"])
        # the device and the checkpoint of the zero-shot baseline; the eval split and mapping
        assert {"models", "train.device", "evaluate.split", "evaluate.surprise"} <= listed, name
        deps = set(stage(name)["deps"])
        assert {"src/ferflow/models", "src/ferflow/training", "src/ferflow/data/cache.py"} <= deps, name
    assert "train.input_size" in stage("zero-shot")["params"]
