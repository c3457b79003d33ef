"""`timm:<arch>` says what it starts from (issue 13, item 3): timm's own weights when they
are in the local Hugging Face cache (never downloaded), else random init with one warning;
run.json and the model card record which; its folders carry no `:`."""

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from ferflow import layout, stages
from ferflow.errors import ConfigError
from ferflow.models import weights, zoo
from ferflow.tracking.card import model_card
from ferflow.tracking.packaging import WEIGHTS_TAG
from ferflow.tracking.queries import Evaluation

from .conftest import load, read_json, write_params

ARCH = "test_efficientnet"  # timm's ~0.3 M-parameter test model; hub weights timm/test_efficientnet.r160_in1k
MODEL = f"timm:{ARCH}"
QUICK = ("train.input_size=48", "train.head_stage.epochs=1", "train.full_stage.epochs=0",
         "train.max_steps_per_epoch=2")


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No Hugging Face or torch hub cache, whatever this machine holds; the once-per-process
    warning forgotten."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf/hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(weights, "_warned_random", set())


def fake_hub_cache(hf_home: Path) -> dict:
    """timm's hub entry for ARCH as huggingface_hub lays it out, holding seeded weights."""
    repo = hf_home / "hub" / f"models--{timm.get_pretrained_cfg(ARCH).hf_hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    torch.manual_seed(7)
    state = {k: v.contiguous() for k, v in timm.create_model(ARCH).state_dict().items()}
    save_file(state, str(snapshot / "model.safetensors"))
    return state


def card_of(info: dict) -> str:
    tags = {WEIGHTS_TAG: "0" * 64, "source_run_id": "r", "eval.manifest_sha256": "0" * 64}
    return model_card("m", {**info, "classes": ["negative", "neutral", "positive"]}, "LFW-FER", tags,
                      Evaluation({}, {}))


def test_model_folders_carry_no_colon():
    assert layout.run_dir("T", "D", MODEL) == Path("T/D/timm-test_efficientnet")
    assert layout.eval_dir("E", "D", MODEL).name == layout.zero_shot_dir("E", MODEL).name == "timm-test_efficientnet"
    assert layout.registry_record("G", "D", MODEL).name == "timm-test_efficientnet.json"
    assert layout.run_dir("T", "D", "demo_tiny") == Path("T/D/demo_tiny")
    # the folder name is the same model (dvc.yaml's paths spell it), given back as the zoo name
    assert zoo.resolve("timm-test_efficientnet") == zoo.resolve(MODEL)
    assert stages.check_model("timm-test_efficientnet") == MODEL


def test_under_dvc_a_name_unlike_its_folder_is_refused(monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "train@LFW-FER-timm")
    assert stages.check_model("timm-test_efficientnet") == MODEL
    with pytest.raises(ConfigError, match="list it as 'timm-test_efficientnet'"):
        stages.check_model(MODEL)


def test_without_cached_weights_it_warns_once_and_records_random(demo_workspace, tmp_path, empty_caches, caplog):
    params = load(demo_workspace, f"train.out_dir={tmp_path / 'm'}", *QUICK)
    with caplog.at_level(logging.WARNING):
        result = stages.train(params, "LFW-FER", MODEL)
        assert weights.timm_weights(zoo.resolve(MODEL)) is None  # a second look says nothing more
    warned = [r for r in caplog.records if "random init" in r.getMessage()]
    assert len(warned) == 1 and MODEL in warned[0].getMessage()
    assert result.run_dir == tmp_path / "m/LFW-FER/timm-test_efficientnet"
    assert not [p for p in (tmp_path / "m").rglob("*") if ":" in p.name]
    info = read_json(result.run_dir / "run.json")
    assert (info["init"], info["weights_source"], info["model"]) == ("random", "none", MODEL)
    assert "| initial weights | random |" in card_of(info)


def test_weights_in_the_local_hf_cache_are_loaded(demo_workspace, tmp_path):
    """A training process with HF_HOME at a cache holding timm's file starts from it, offline:
    the head stage trains only the head, so every other tensor is still the cached one."""
    state = fake_hub_cache(tmp_path / "hf")
    params_file = write_params(tmp_path / "p.yaml", demo_workspace, f"train.out_dir={tmp_path / 'm'}", *QUICK)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "t")}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-m", "ferflow.cli", "train", "--dataset", "LFW-FER", "--model", MODEL,
                           "--params", str(params_file)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "random init" not in done.stderr
    run = tmp_path / "m/LFW-FER/timm-test_efficientnet"
    info = read_json(run / "run.json")
    cached = next((tmp_path / "hf").rglob("model.safetensors"))
    assert info["init"] == "timm-pretrained"
    assert info["weights_source"].startswith("hf-hub:timm/test_efficientnet.r160_in1k@0123456789abcdef")
    assert info["weights_sha256"] == hashlib.sha256(cached.read_bytes()).hexdigest()
    trained = load_file(str(run / "best.safetensors"))
    trunk = [k for k in state if not k.startswith("classifier.")]
    assert trunk and all(torch.equal(trained[k], state[k]) for k in trunk)
    assert trained["classifier.weight"].shape[0] == 3
    assert "| initial weights | timm-pretrained |" in card_of(info)
    assert json.loads((run / "run.json").read_text())["model"] == MODEL
