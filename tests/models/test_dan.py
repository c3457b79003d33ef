"""DAN: shapes, losses and their gradients, trunk weights from an MS-Celeb-style state_dict."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torchvision

from ferflow.errors import FerflowError
from ferflow.models import zoo
from ferflow.models.dan import DAN, DANLoss, load_trunk
from ferflow.models.weights import load_pretrained


@pytest.fixture
def model() -> DAN:
    torch.manual_seed(0)
    return DAN(num_classes=7)


def test_forward_shapes(model):
    logits, features, heads = model(torch.randn(3, 3, 64, 64))
    assert logits.shape == (3, 7) and features.shape == (3, 512) and heads.shape == (3, 4, 512)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64))[0].shape == (1, 7)


def test_losses_are_finite_and_train_everything(model):
    criterion = DANLoss(7, label_smoothing=0.1, class_weights=torch.linspace(0.5, 1.5, 7))
    targets = torch.tensor([0, 3, 6, 3])
    total, parts = criterion(model(torch.randn(4, 3, 64, 64)), targets)
    assert set(parts) == {"ce", "affinity", "partition"}
    assert all(math.isfinite(v.item()) and v.item() >= 0 for v in parts.values())
    assert total.item() == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-5)
    total.backward()
    assert criterion.centres.grad is not None and criterion.centres.grad.abs().sum() > 0
    names = ("trunk.conv1.weight", "heads.0.spatial.conv3x3.0.weight", "heads.3.channel.gate.0.weight", "fc.weight")
    for name in names:
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_affinity_and_partition_values():
    criterion = DANLoss(2, feat_dim=2, num_heads=2)
    with torch.no_grad():
        criterion.centres.copy_(torch.tensor([[0.0, 0.0], [2.0, 2.0]]))
    # Each feature 1 away (squared) from its centre; centres' variance per dim is 2, summed 4.
    features = torch.tensor([[1.0, 0.0], [2.0, 3.0]])
    assert criterion.affinity(features, torch.tensor([0, 1])).item() == pytest.approx(1 / 4)
    heads = torch.tensor([[[0.0, 0.0], [2.0, 2.0]]])  # variance across 2 heads: 2 per dim
    assert criterion.partition(heads).item() == pytest.approx(math.log(1 + 2 / 2))
    assert DANLoss(2, num_heads=1).partition(torch.randn(2, 1, 512)).item() == 0


def msceleb_like(tmp_path, trunk_source: torchvision.models.ResNet):
    """The layout of resnet18_msceleb.pth: {"state_dict": {"module.<key>": ...}} with an fc head."""
    state = OrderedDict((f"module.{k}", v) for k, v in trunk_source.state_dict().items())
    state["module.fc.weight"] = torch.randn(10, 512)  # face-identity head of another width
    state["module.fc.bias"] = torch.randn(10)
    path = tmp_path / "resnet18_msceleb.pth"
    torch.save({"epoch": 3, "state_dict": state}, path)
    return path


def test_trunk_loads_from_msceleb_layout(model, tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None)
    load_trunk(model, msceleb_like(tmp_path, source))
    for key, value in model.trunk.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_dan_zoo_entry_with_trunk_weights(tmp_path):
    torch.manual_seed(2)
    source = torchvision.models.resnet18(weights=None)
    weights = load_pretrained(msceleb_like(tmp_path, source), tmp_path / "cache")
    model = zoo.build_model(zoo.resolve("dan"), num_classes=3, pretrained=weights)
    assert torch.equal(model.trunk.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.eval()(torch.randn(2, 3, 64, 64))[0].shape == (2, 3)


def test_whole_dan_state_dict_round_trip(model, tmp_path):
    torch.save(model.state_dict(), tmp_path / "dan.pth")
    rebuilt = zoo.build_model(zoo.resolve("dan"), pretrained=load_pretrained(tmp_path / "dan.pth", tmp_path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x)[0], model.eval()(x)[0], rtol=0, atol=0)


def test_wrong_trunk_is_refused(model):
    with pytest.raises(FerflowError, match="not a torchvision ResNet-18 trunk"):
        load_trunk(model, torchvision.models.resnet34(weights=None).state_dict())


def test_trainer_finds_dans_own_objective(model):
    """The trainer's generic hooks (training.losses) give DAN its own loss, and a timm model
    weighted cross-entropy on its logits."""
    import numpy as np
    from torch import nn

    from ferflow.config import LossSettings
    from ferflow.models.inference import forward
    from ferflow.training.losses import build_criterion, class_weights, loss_function

    cfg = LossSettings(class_weights="inverse_frequency", label_smoothing=0.1)
    labels = np.array([0, 0, 0, 1, 2, 2])
    model = zoo.swap_head(model, zoo.resolve("dan"), 3)
    criterion = build_criterion(model, cfg, labels, 3)
    assert isinstance(criterion, DANLoss) and criterion.label_smoothing == 0.1
    torch.testing.assert_close(criterion.class_weights, class_weights(cfg, labels, 3))
    targets = torch.tensor([0, 1, 2, 2])
    logits, out = forward(model, torch.randn(4, 3, 64, 64))
    loss = loss_function(model)(criterion, logits, out, targets)
    assert loss.ndim == 0 and torch.equal(loss, criterion(out, targets)[0])  # affinity and partition included

    tiny = zoo.build_model(zoo.resolve("demo_tiny"), num_classes=3)
    ce = build_criterion(tiny, cfg, labels, 3)
    assert type(ce) is nn.CrossEntropyLoss
    logits, out = forward(tiny, torch.randn(4, 3, 32, 32))
    torch.testing.assert_close(loss_function(tiny)(ce, logits, out, targets), ce(logits, targets))
