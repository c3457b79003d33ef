"""Augmentation of normalised batches on the training device (normalisation itself is the
inference path's: ferflow.models.inference.Normalize).

The cache hands over uint8 NCHW tensors; everything else happens here, batched, so the
input path costs no per-image Python work (timm-style GPU augmentation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ferflow.config import AugmentSettings


def augment(x: torch.Tensor, cfg: AugmentSettings) -> torch.Tensor:
    """Random flip, affine (rotate/translate/scale) and erasing on a normalised batch.

    Uses the global torch RNG of x's device, so seeded runs (and resumed ones, which
    restore the RNG state) draw the same augmentations.
    """
    n = x.shape[0]
    flip = torch.rand(n, device=x.device) < 0.5 if cfg.hflip else None
    lo, hi = cfg.scale
    if cfg.rotate_deg > 0 or cfg.translate > 0 or lo != 1.0 or hi != 1.0:
        x = _random_affine(x, cfg.rotate_deg, cfg.translate, lo, hi, flip)
    elif flip is not None:
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    if cfg.erasing_p > 0:
        x = _random_erase(x, cfg.erasing_p)
    return x


def _random_affine(x: torch.Tensor, degrees: float, translate: float, lo: float, hi: float,
                   flip: torch.Tensor | None = None) -> torch.Tensor:
    """One grid_sample per batch; a horizontal flip is folded into the same transform (its
    output x coordinate negated), so flipping costs no pass of its own."""
    n = x.shape[0]
    dev = x.device
    angle = (torch.rand(n, device=dev) * 2 - 1) * math.radians(degrees)
    zoom = lo + torch.rand(n, device=dev) * (hi - lo)
    shift = (torch.rand(n, 2, device=dev) * 2 - 1) * translate * 2  # grid coords span 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    mirror = torch.where(flip, -1.0, 1.0).to(cos.dtype) if flip is not None else torch.ones_like(cos)
    theta = torch.stack([torch.stack([cos * mirror, -sin, shift[:, 0]], 1),
                         torch.stack([sin * mirror, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    # Zero in normalised space is the mean colour: a neutral fill for exposed corners.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _random_erase(x: torch.Tensor, p: float, area: tuple = (0.02, 0.2), ratio: tuple = (0.3, 3.3)) -> torch.Tensor:
    n, _, h, w = x.shape
    dev = x.device
    apply = torch.rand(n, device=dev) < p
    target = torch.empty(n, device=dev).uniform_(*area) * h * w
    log_r = torch.empty(n, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    eh = (target * torch.exp(log_r)).sqrt().clamp(1, h)
    ew = (target / torch.exp(log_r)).sqrt().clamp(1, w)
    top = torch.rand(n, device=dev) * (h - eh)
    left = torch.rand(n, device=dev) * (w - ew)
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    box = (
        (rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1)) & (cols < (left + ew).view(n, 1, 1))
        & apply.view(n, 1, 1)
    )
    return x.masked_fill(box.unsqueeze(1), 0.0)
