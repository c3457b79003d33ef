"""`ferflow evaluate` without --on: the archives prepared at the model's size, the others
named as skipped; --on an unprepared one still fails."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ferflow import stages
from ferflow.config import load_params
from ferflow.evaluation.evaluate import prepared_eval_datasets
from ferflow.errors import FerflowError

REPO = Path(__file__).resolve().parents[2]
SIZE = 32
OTHERS = ("M-LFW-FER", "M-LFW-FER-face-cut")


@pytest.fixture(scope="module")
def only_lfw_prepared(tmp_path_factory):
    """Demo archives, all fetched, only LFW-FER prepared (at SIZE), and demo_tiny trained on it."""
    ws = tmp_path_factory.mktemp("eval-defaults")
    base = load_params(REPO / "params.yaml", [
        f"demo.out_dir={ws / 'archives'}", "demo.images_per_class=12", f"demo.image_size={SIZE}", "demo.overrides=[]",
        f"data.raw_dir={ws / 'raw'}", f"data.prepared_dir={ws / 'prepared'}", f"prepare.image_sizes=[{SIZE}]",
        "prepare.workers=1", "prepare.split.val_fraction=0.25", "fetch.progress=false",
    ])
    params_file = ws / "params.yaml"
    stages.demo_data(base, params_out=params_file)
    params = load_params(params_file, [
        "train.models=[demo_tiny]", "train.datasets=[LFW-FER]", f"train.input_size={SIZE}", "train.batch_size=16",
        "train.head_stage.epochs=1", "train.full_stage.epochs=0", "train.max_steps_per_epoch=2", "train.workers=0",
        "train.threads=1", "train.device=cpu", "tracking.enabled=false",
        f"train.out_dir={ws / 'models'}", f"evaluate.out_dir={ws / 'evaluation'}",
    ])
    stages.fetch(params)
    stages.prepare(params, ["LFW-FER"])
    stages.train(params, "LFW-FER", "demo_tiny")
    return params


def test_the_default_is_the_prepared_archives_and_each_skip_is_one_line(only_lfw_prepared, caplog):
    params = only_lfw_prepared
    with caplog.at_level(logging.WARNING, logger="ferflow.evaluation.evaluate"):
        assert prepared_eval_datasets(params, "LFW-FER", SIZE) == ["LFW-FER"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == len(OTHERS)
    for name, line in zip(OTHERS, lines):
        assert line.startswith(f"evaluate: skipping {name}: ") and "\n" not in line
        assert f"ferflow prepare --dataset {name}" in line
    with pytest.raises(FerflowError, match=f"no dataset is prepared at size {2 * SIZE}"):
        prepared_eval_datasets(params, "LFW-FER", 2 * SIZE)


def test_evaluate_without_on_evaluates_what_is_prepared(only_lfw_prepared, caplog):
    with caplog.at_level(logging.WARNING, logger="ferflow.evaluation.evaluate"):
        summary = stages.evaluate(only_lfw_prepared, "LFW-FER", "demo_tiny")
    assert list(summary) == ["LFW-FER"]
    assert [r.getMessage().split(":")[1].strip() for r in caplog.records] == ["skipping M-LFW-FER",
                                                                              "skipping M-LFW-FER-face-cut"]


def test_on_an_unprepared_archive_still_fails(only_lfw_prepared):
    with pytest.raises(FerflowError, match="M-LFW-FER is not prepared .*ferflow prepare --dataset M-LFW-FER"):
        stages.evaluate(only_lfw_prepared, "LFW-FER", "demo_tiny", ["M-LFW-FER"])
