"""The fine-tuning recipe of issue 8: mapped head (step 0 = zero-shot), layer-wise learning
rates, frozen BatchNorm statistics and class weights, on a tiny "pretrained" 7-class model."""

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

from ferflow import stages
from ferflow.config import LossSettings
from ferflow.data.cache import CachedSplit
from ferflow.models import zoo
from ferflow.models.heads import MappedHead
from ferflow.training.checkpoint import load_last, load_weights
from ferflow.training.losses import class_weights, inverse_frequency_weights
from ferflow.training.optim import layer_decay_groups

from .conftest import load, read_json

TINY = zoo.ZooEntry("tiny_fer7", "test_efficientnet", 48, "avg", "sequential", zoo.HSEMOTION_7, bn_eps=1e-3)


@pytest.fixture(scope="module")
def tiny_fer7(tmp_path_factory, demo_workspace):
    """A 7-class expression model stored as a checkpoint, its head centred and scaled on the
    demo images so that its zero-shot predictions differ from image to image (a random head
    would predict one class for all)."""
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=7, bn_eps=1e-3, global_pool="avg").eval()
    model.classifier = torch.nn.Sequential(torch.nn.Linear(model.num_features, 7))
    images = CachedSplit(load(demo_workspace).data.prepared_dir / "LFW-FER", "train", 48).images[:256]
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(zoo.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(zoo.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        head = model.classifier[0]
        z = feats @ head.weight.T
        head.weight.div_(z.std(0, keepdim=True).T / 3)
        head.bias.copy_(-(feats @ head.weight.T).mean(0))
    path = tmp_path_factory.mktemp("tiny-fer7") / "tiny_fer7.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def with_tiny(monkeypatch):
    monkeypatch.setitem(zoo.ZOO, TINY.name, TINY)


def tiny_params(demo_workspace, tiny_fer7, tmp_path, *extra):
    return load(demo_workspace, f"models.tiny_fer7.pretrained={tiny_fer7}", f"train.out_dir={tmp_path / 'models'}",
                f"evaluate.out_dir={tmp_path / 'evaluation'}", "train.models=[tiny_fer7]", *extra)


def test_step0_predictions_equal_zero_shot(demo_workspace, tiny_fer7, tmp_path, with_tiny):
    """No training at all: the mapped head's checkpoint predicts exactly what zero-shot does."""
    params = tiny_params(demo_workspace, tiny_fer7, tmp_path, "train.head_stage.epochs=0",
                         "train.full_stage.epochs=0")
    result = stages.train(params, "LFW-FER", "tiny_fer7")
    assert result.best_epoch == 0 and [h["stage"] for h in result.history] == ["start"]
    weights = load_weights(result.run_dir / "best.safetensors")
    assert "classifier.member" in weights  # the saved head describes its own grouping

    tuned = stages.evaluate(params, "LFW-FER", "tiny_fer7", ["LFW-FER"])["LFW-FER"]
    zero = stages.zero_shot(params, "tiny_fer7", ["LFW-FER"])["LFW-FER"]
    root = params.evaluate.out_dir
    a = pd.read_csv(root / "fine-tuned/LFW-FER/tiny_fer7/LFW-FER/predictions.csv")
    b = pd.read_csv(root / "zero-shot/none/tiny_fer7/LFW-FER/predictions.csv")
    assert a["predicted"].nunique() > 1, "the test model must not predict one class only"
    assert (a["path"] == b["path"]).all() and (a["predicted"] == b["predicted"]).all()
    probs = [f"p_{c}" for c in ("negative", "neutral", "positive")]
    np.testing.assert_allclose(a[probs].to_numpy(), b[probs].to_numpy(), atol=2e-6)
    assert tuned["accuracy"] == zero["accuracy"] == tuned["baseline_accuracy"]
    assert tuned["macro_f1"] == pytest.approx(tuned["baseline_macro_f1"])


def test_mapped_start_is_the_first_best_and_training_goes_on(demo_workspace, tiny_fer7, tmp_path, with_tiny):
    params = tiny_params(demo_workspace, tiny_fer7, tmp_path, "train.head_stage.epochs=1",
                         "train.full_stage.epochs=1", "train.batchnorm=frozen", "train.layer_decay=0.7")
    result = stages.train(params, "LFW-FER", "tiny_fer7")
    history = read_json(result.run_dir / "history.json")
    assert [h["epoch"] for h in history] == [0, 1, 2] and history[0]["train_loss"] is None
    best = max(history, key=lambda h: h["val_accuracy"])
    assert result.best_epoch == best["epoch"]  # the start competes with every epoch
    info = read_json(result.run_dir / "run.json")
    assert info["head_init"] == "mapped" and info["batchnorm"] == "frozen"


def test_random_head_init_has_no_start_record(demo_workspace, tiny_fer7, tmp_path, with_tiny):
    params = tiny_params(demo_workspace, tiny_fer7, tmp_path, "train.head_init=random",
                         "train.head_stage.epochs=1", "train.full_stage.epochs=0")
    result = stages.train(params, "LFW-FER", "tiny_fer7")
    assert [h["epoch"] for h in result.history] == [1]
    assert "classifier.weight" in load_weights(result.run_dir / "best.safetensors")


def test_mapped_head_equals_collapsed_softmax():
    old = torch.nn.Linear(16, 7)
    mapping = {0: 0, 1: 0, 2: 0, 3: 2, 4: 1, 5: 0, 6: None}  # HSEmotion-7, Surprise dropped
    head = MappedHead.from_linear(old, mapping, 3)
    x = torch.randn(64, 16)
    p7 = torch.softmax(old(x)[:, :6], dim=1)  # Surprise's logit dropped, the rest renormalised
    expected = torch.stack([p7[:, [0, 1, 2, 5]].sum(1), p7[:, 4], p7[:, 3]], 1)
    torch.testing.assert_close(torch.softmax(head(x), 1), expected, atol=1e-6, rtol=0)
    rebuilt = MappedHead.from_state_dict({f"c.{k}": v for k, v in head.state_dict().items()}, "c.")
    rebuilt.load_state_dict(head.state_dict())
    torch.testing.assert_close(rebuilt(x), head(x))


def test_mapped_head_needs_a_row_for_every_class():
    with pytest.raises(ValueError, match="every one of the 3 classes"):
        MappedHead(8, [0, 0, 2], 3)


def test_layer_decay_scales_fall_with_depth():
    model = timm.create_model("test_efficientnet", num_classes=3)
    head = list(model.classifier.parameters())
    groups = layer_decay_groups(model, head, 0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert {scale[id(p)] for p in head} == {1.0}
    assert scale[id(model.conv_stem.weight)] == min(scale.values()) < scale[id(model.conv_head.weight)] < 1.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert {g["lr_scale"] for g in layer_decay_groups(model, head, 1.0)} == {1.0}


def test_frozen_batchnorm_keeps_pretrained_statistics(demo_workspace, tiny_fer7, tmp_path, with_tiny):
    params = tiny_params(demo_workspace, tiny_fer7, tmp_path, "train.head_stage.epochs=0",
                         "train.full_stage.epochs=1", "train.batchnorm=frozen", "train.head_init=random",
                         "train.max_steps_per_epoch=3")
    stages.train(params, "LFW-FER", "tiny_fer7")
    start = load_weights(tiny_fer7)
    last = load_last(params.train.out_dir / "LFW-FER/tiny_fer7/last.pt")["model"]
    stats = [k for k in start if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(start[k], last[k]) for k in stats)
    assert not torch.equal(start["conv_stem.weight"], last["conv_stem.weight"])  # the weights did learn

    trained = tiny_params(demo_workspace, tiny_fer7, tmp_path / "bn-train", "train.head_stage.epochs=0",
                          "train.full_stage.epochs=1", "train.batchnorm=train", "train.head_init=random",
                          "train.max_steps_per_epoch=3")
    stages.train(trained, "LFW-FER", "tiny_fer7")
    moved = load_last(trained.train.out_dir / "LFW-FER/tiny_fer7/last.pt")["model"]
    assert any(not torch.equal(start[k], moved[k]) for k in stats)


def test_class_weight_options():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    full = inverse_frequency_weights(labels, 3)
    assert class_weights(LossSettings(class_weights="none"), labels, 3) is None
    torch.testing.assert_close(class_weights(LossSettings(class_weights="inverse_frequency"), labels, 3), full)
    torch.testing.assert_close(class_weights(LossSettings(class_weights="sqrt_inverse_frequency"), labels, 3),
                               full.sqrt())


def test_one_model_trained_on_the_union_is_evaluated_on_each_archive(demo_workspace, tmp_path):
    params = load(demo_workspace, f"train.out_dir={tmp_path / 'models'}", f"evaluate.out_dir={tmp_path / 'eval'}",
                  "train.datasets=[LFW-emotion-all]", "train.head_stage.epochs=0", "train.full_stage.epochs=1",
                  "train.max_steps_per_epoch=4")
    stages.prepare(params, ["LFW-emotion-all"])
    result = stages.train(params, "LFW-emotion-all", "demo_tiny")
    info = read_json(result.run_dir / "run.json")
    assert info["n_train"] > 3 * 1000  # the three archives' training images together
    summary = stages.evaluate(params, "LFW-emotion-all", "demo_tiny")
    assert list(summary) == ["LFW-FER", "M-LFW-FER", "M-LFW-FER-face-cut", "LFW-emotion-all"]
    assert summary["LFW-emotion-all"]["n"] == sum(summary[d]["n"] for d in list(summary)[:3])
