"""Losses and optimizers of the fine-tuning recipes."""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from ferflow.config import LossSettings, OptimizerSettings


def inverse_frequency_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """w_c = N / (K * n_c): HSEmotion's weighting, mean weight 1 over samples."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    counts[counts == 0] = 1.0
    return torch.tensor(len(labels) / (num_classes * counts), dtype=torch.float32)


def build_criterion(cfg: LossSettings, train_labels: np.ndarray, num_classes: int) -> nn.Module:
    weight = inverse_frequency_weights(train_labels, num_classes) if cfg.class_weights == "inverse_frequency" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimizerSettings, lr: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    # No weight decay on norms and biases (1-d tensors), as timm does.
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "adamw":
        base = torch.optim.AdamW(groups, lr=lr)
    elif cfg.name == "adam":
        # Adam's weight decay is L2 in the gradient; HSEmotion's recipe uses none.
        base = torch.optim.Adam(groups, lr=lr)
    else:
        base = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)
    return SAM(base, cfg.sam_rho) if cfg.sam else base


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimisation around a base optimizer (Foret et al. 2021).

    `step(closure)` climbs to w + rho * g/|g|, re-evaluates the loss there through the
    closure, returns to w and lets the base optimizer step with the sharpness-aware grad.
    """

    def __init__(self, base: torch.optim.Optimizer, rho: float = 0.05):
        self.base = base
        self.rho = rho
        super().__init__(base.param_groups, {"lr": base.defaults["lr"]})
        self.param_groups = base.param_groups
        self.state = base.state

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.norm(torch.stack([p.grad.norm(2) for p in params]), 2) + 1e-12
        bumps = []
        for p in params:
            e = p.grad * (self.rho / norm)
            p.add_(e)
            bumps.append(e)
        with torch.enable_grad():
            loss = closure()
        for p, e in zip(params, bumps):
            p.sub_(e)
        self.base.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base.load_state_dict(state_dict)


def cosine_with_warmup(total_steps: int, warmup_fraction: float, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier per step: linear warmup, then cosine down to `min_ratio`."""
    import math

    warmup = int(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
