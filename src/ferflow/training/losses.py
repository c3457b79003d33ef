"""Losses of the fine-tuning recipes."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from ferflow.config import LossSettings


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


def build_criterion(cfg: LossSettings, train_labels: np.ndarray, num_classes: int) -> nn.Module:
    return nn.CrossEntropyLoss(weight=class_weights(cfg, train_labels, num_classes),
                               label_smoothing=cfg.label_smoothing)
