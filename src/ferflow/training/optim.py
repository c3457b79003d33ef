"""Optimizers (AdamW, Adam, SGD, SAM around any of them) and learning-rate schedules of the
fine-tuning recipes."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from ferflow.config import OptimizerSettings, TrainSettings


def layer_decay_groups(model: nn.Module, head: Iterable[nn.Parameter], layer_decay: float) -> list[dict]:
    """Parameter groups with an `lr_scale` that shrinks by `layer_decay` per layer below the head.

    timm models define their depth order (`group_matcher`: stem, each block, conv_head);
    the classifier sits on top with scale 1. Models without one (DAN) get two levels:
    the head at 1 and everything else at `layer_decay`. Weight decay is split as timm does.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head_ids = {id(p) for p in head}
    if layer_decay >= 1.0:
        depth = {n: 0 for n, _ in trainable}
    elif hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        layers = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
        top = max(layers.values())  # the classifier's layer: unmatched names land there too
        depth = {n: 0 if id(p) in head_ids else max(1, top - layers.get(n, top)) for n, p in trainable}
    else:
        depth = {n: 0 if id(p) in head_ids else 1 for n, p in trainable}
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in trainable:
        key = (depth[name], p.ndim > 1)
        group = groups.setdefault(key, {"params": [], "lr_scale": layer_decay ** key[0], "decay": key[1]})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(groups: list[dict], cfg: OptimizerSettings, lr: float) -> torch.optim.Optimizer:
    """`groups` from `layer_decay_groups`: lr x lr_scale each; no weight decay on 1-d
    tensors (norms, biases), as timm does."""
    param_groups = [
        {"params": g["params"], "lr": lr * g["lr_scale"], "lr_scale": g["lr_scale"],
         "weight_decay": cfg.weight_decay if g["decay"] else 0.0}
        for g in groups if g["params"]
    ]
    if cfg.name == "adamw":
        base = torch.optim.AdamW(param_groups, lr=lr)
    elif cfg.name == "adam":
        # Adam's weight decay is L2 in the gradient; HSEmotion's recipe uses none.
        base = torch.optim.Adam(param_groups, lr=lr)
    else:
        base = torch.optim.SGD(param_groups, lr=lr, momentum=cfg.momentum, nesterov=True)
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
    warmup = int(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainSettings,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step over a stage's `total_steps`: `train.schedule`."""
    if cfg.schedule == "constant":
        factor = lambda _step: 1.0  # noqa: E731
    else:
        factor = cosine_with_warmup(total_steps, cfg.warmup_fraction, cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
