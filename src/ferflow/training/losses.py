"""Losses of the fine-tuning recipes: class weights, the criterion, and how a model's outputs
become the loss the trainer minimises (cross-entropy on the logits, unless the model brings
its own objective: `OwnObjective`, e.g. DAN's in ferflow.models.dan)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from ferflow.config import LossSettings

# (criterion, logits, raw model output, targets) -> the scalar loss to minimise
LossFn = Callable[[nn.Module, Tensor, Any, Tensor], Tensor]


@runtime_checkable
class OwnObjective(Protocol):
    """A model that trains with its own objective instead of cross-entropy on its logits.

    The criterion it builds is learned and resumed with the model: its parameters join the
    optimizer and its state is saved in last.pt.
    """

    def training_criterion(self, num_classes: int, label_smoothing: float,
                           class_weights: Optional[Tensor]) -> nn.Module: ...

    def training_loss(self, criterion: nn.Module, logits: Tensor, outputs: Any, targets: Tensor) -> Tensor: ...


def inverse_frequency_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """w_c = N / (K * n_c): HSEmotion's weighting, mean weight 1 over samples."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    counts[counts == 0] = 1.0
    return torch.tensor(len(labels) / (num_classes * counts), dtype=torch.float32)


def class_weights(cfg: LossSettings, labels: np.ndarray, num_classes: int) -> Optional[torch.Tensor]:
    """Per-class loss weights of `loss.class_weights`, or None for an unweighted loss."""
    if cfg.class_weights == "none":
        return None
    weights = inverse_frequency_weights(labels, num_classes)
    return weights.sqrt() if cfg.class_weights == "sqrt_inverse_frequency" else weights


def build_criterion(model: nn.Module, cfg: LossSettings, train_labels: np.ndarray, num_classes: int) -> nn.Module:
    """The model's own criterion (`OwnObjective`), else weighted, smoothed cross-entropy."""
    weights = class_weights(cfg, train_labels, num_classes)
    if isinstance(model, OwnObjective):
        return model.training_criterion(num_classes, cfg.label_smoothing, weights)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)


def loss_function(model: nn.Module) -> LossFn:
    """How one training forward of `model` becomes its loss (resolved once, not per step)."""
    return model.training_loss if isinstance(model, OwnObjective) else logits_loss


def logits_loss(criterion: nn.Module, logits: Tensor, outputs: Any, targets: Tensor) -> Tensor:
    return criterion(logits, targets)
