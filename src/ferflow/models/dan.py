"""DAN, "Distract Your Attention" (Wen et al.; reference code yaoing/DAN), written from the
description in shared/design/FACTS.md ("DAN"): a ResNet-18 trunk, several cross-attention
heads (spatial then channel attention), fused by a log-softmax across heads, and a loss of
cross-entropy + affinity (features to class centres) + partition (heads kept apart).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from ferflow.errors import FerflowError
from ferflow.models.checkpoints import read_checkpoint, strip_prefixes

FEAT_DIM = 512  # ResNet-18's last stage width
TRUNK_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def _conv_bn(cin: int, cout: int, kernel: tuple[int, int]) -> nn.Sequential:
    padding = (kernel[0] // 2, kernel[1] // 2)  # keeps the 7x7 map
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=padding), nn.BatchNorm2d(cout))


class SpatialAttention(nn.Module):
    """1x1 reduce, then 3x3 + 1x3 + 3x1 branches summed; the channel sum weights the input map."""

    def __init__(self, channels: int = FEAT_DIM, reduced: int = 256) -> None:
        super().__init__()
        self.reduce = _conv_bn(channels, reduced, (1, 1))
        self.conv3x3 = _conv_bn(reduced, channels, (3, 3))
        self.conv1x3 = _conv_bn(reduced, channels, (1, 3))
        self.conv3x1 = _conv_bn(reduced, channels, (3, 1))

    def forward(self, x: Tensor) -> Tensor:
        y = self.reduce(x)
        y = F.relu(self.conv3x3(y) + self.conv1x3(y) + self.conv3x1(y))
        return x * y.sum(dim=1, keepdim=True)


class ChannelAttention(nn.Module):
    """Squeeze-excitation on the pooled features: GAP -> 512->32 -> BN -> ReLU -> 32->512 -> sigmoid."""

    def __init__(self, channels: int = FEAT_DIM, hidden: int = 32) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.Linear(channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, channels), nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        pooled = x.mean(dim=(2, 3))
        return pooled * self.gate(pooled)


class CrossAttentionHead(nn.Module):
    def __init__(self, channels: int = FEAT_DIM) -> None:
        super().__init__()
        self.spatial = SpatialAttention(channels)
        self.channel = ChannelAttention(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.channel(self.spatial(x))


class DAN(nn.Module):
    """forward(images) -> (logits (B, classes), features (B, 512), head outputs (B, heads, 512)).

    `features` are the pooled trunk maps (what the affinity loss pulls to class centres);
    head outputs are taken before the cross-head log-softmax (what the partition loss spreads).
    BatchNorm1d layers need batches of 2+ in training mode.
    """

    def __init__(self, num_classes: int = 7, num_heads: int = 4) -> None:
        super().__init__()
        resnet = torchvision.models.resnet18(weights=None)
        # Same child names as torchvision's ResNet, so MS-Celeb trunk keys load unchanged.
        self.trunk = nn.Sequential(OrderedDict((name, getattr(resnet, name)) for name in TRUNK_LAYERS))
        self.heads = nn.ModuleList(CrossAttentionHead() for _ in range(num_heads))
        self.fc = nn.Linear(FEAT_DIM, num_classes)
        self.bn = nn.BatchNorm1d(num_classes)
        self.num_classes, self.num_heads = num_classes, num_heads
        self._init_attention()

    def _init_attention(self) -> None:
        for module in [*self.heads.modules(), self.fc]:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=1e-3)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        maps = self.trunk(x)
        heads = torch.stack([head(maps) for head in self.heads], dim=1)
        # Log-softmax across heads makes them compete per feature before they are summed.
        fused = F.log_softmax(heads, dim=1).sum(dim=1) if self.num_heads > 1 else heads[:, 0]
        return self.bn(self.fc(fused)), maps.mean(dim=(2, 3)), heads

    # DAN trains with its own objective (the trainer finds these hooks on the model:
    # ferflow.training.losses.OwnObjective), not with cross-entropy on the logits alone.
    def training_criterion(self, num_classes: int, label_smoothing: float, class_weights: Tensor | None) -> DANLoss:
        return DANLoss(num_classes, num_heads=self.num_heads, label_smoothing=label_smoothing,
                       class_weights=class_weights)

    def training_loss(self, criterion: DANLoss, logits: Tensor, outputs: tuple[Tensor, Tensor, Tensor],
                      targets: Tensor) -> Tensor:
        return criterion(outputs, targets)[0]  # the total; its parts are for inspection


def load_trunk(model: DAN, source: Path | Mapping[str, Tensor]) -> None:
    """Load ResNet-18 trunk weights (e.g. resnet18_msceleb.pth) strictly; its `fc.*` head is dropped."""
    if isinstance(source, Mapping):
        state_dict, where = dict(source), "the given state_dict"
    else:
        state_dict, where = read_checkpoint(Path(source)).state_dict, str(source)  # finds a nested "state_dict"
    state_dict = strip_prefixes({k: v for k, v in strip_prefixes(state_dict).items() if not k.startswith("fc.")})
    own = model.trunk.state_dict()
    # Checkpoints from torch < 0.4.1 lack BN's num_batches_tracked: keep our zeros for those.
    for key in own:
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = own[key]
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise FerflowError(
            f"{where} is not a torchvision ResNet-18 trunk: missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"
        )
    try:
        model.trunk.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise FerflowError(f"{where} does not fit DAN's ResNet-18 trunk: {' '.join(str(exc).split())}") from exc


class DANLoss(nn.Module):
    """Cross-entropy + lambda_af * affinity + lambda_pt * partition; returns (total, parts).

    The class centres are parameters of this module: give them to the optimizer too.
    """

    def __init__(
        self,
        num_classes: int,
        feat_dim: int = FEAT_DIM,
        num_heads: int = 4,
        lambda_af: float = 1.0,
        lambda_pt: float = 1.0,
        label_smoothing: float = 0.0,
        class_weights: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.randn(num_classes, feat_dim))
        self.register_buffer("class_weights", None if class_weights is None else torch.as_tensor(class_weights).float())
        self.num_heads, self.lambda_af, self.lambda_pt = num_heads, lambda_af, lambda_pt
        self.label_smoothing = label_smoothing

    def affinity(self, features: Tensor, targets: Tensor) -> Tensor:
        # Pull features to their class centre; dividing by the centres' spread keeps the
        # centres from collapsing together to shrink the distances.
        distance = (features.float() - self.centres[targets]).pow(2).sum(dim=1).mean()
        return distance / (self.centres.var(dim=0).sum() + 1e-12)

    def partition(self, heads: Tensor) -> Tensor:
        if heads.size(1) != self.num_heads:
            raise ValueError(f"expected {self.num_heads} head outputs, got {heads.size(1)}")
        if self.num_heads < 2:
            return heads.new_zeros(())
        # Large variance across heads = heads attend to different things = small loss.
        variance = heads.float().var(dim=1).mean(dim=1)
        return torch.log1p(self.num_heads / (variance + 1e-12)).mean()

    def forward(self, outputs: tuple[Tensor, Tensor, Tensor], targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits, features, heads = outputs
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        ce = F.cross_entropy(logits.float(), targets, weight=weight, label_smoothing=self.label_smoothing)
        af = self.affinity(features, targets)
        pt = self.partition(heads)
        total = ce + self.lambda_af * af + self.lambda_pt * pt
        return total, {"ce": ce.detach(), "affinity": af.detach(), "partition": pt.detach()}
