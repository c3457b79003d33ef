"""Synthetic face masks drawn on batches of face images, on any torch device.

One renderer serves two uses: training augmentation (`train.augment.synthetic_mask_p`, on
the training device, where faces are placed by aligned-face geometry with random jitter)
and `ferflow synthesize-masks` (whole archives, where a face detector's landmarks place
them when it finds a face). The LFW emotion paper's masking tool was never released
(shared/design/FACTS.md), so the styles here are our own: what people wear in photos.

A mask is a shape in a face-aligned frame (rotated with the eye line): its top edge runs
across the nose bridge, its bottom edge under the chin, its sides over the cheeks. Each
style bends those edges differently and shades the cloth: pleats (surgical), a smooth
cup (N95), a vertical seam and fold (KN95), a soft fabric with a centre seam (cloth).
Colours are plain (white, light blue, light grey), dark, coloured (any hue) or
patterned (stripes, dots, checks). Pixels at the edge are blended by coverage, so masks
have no jagged outline at 48 px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

STYLES = ("surgical", "cloth", "n95", "kn95")
COLOURS = ("plain", "dark", "coloured", "patterned")

# Landmarks of a frontal face as fractions of its face box (x, y): left eye, right eye,
# nose tip, mouth centre. Measured proportions of aligned face crops (MTCNN-style boxes).
CANONICAL_LANDMARKS = ((0.31, 0.38), (0.69, 0.38), (0.50, 0.60), (0.50, 0.79))


@dataclass(frozen=True)
class FaceGeometry:
    """Per-image face landmarks in normalised image coordinates ([0, 1], x right, y down).

    eyes: (N, 2, 2) left and right eye; nose: (N, 2) tip; mouth: (N, 2) centre.
    """

    eyes: Tensor
    nose: Tensor
    mouth: Tensor

    def __len__(self) -> int:
        return self.nose.shape[0]

    @classmethod
    def from_boxes(cls, boxes: Tensor) -> "FaceGeometry":
        """Canonical landmarks placed in face boxes (N, 4: x0, y0, x1, y1, normalised)."""
        ref = torch.tensor(CANONICAL_LANDMARKS, dtype=boxes.dtype, device=boxes.device)
        origin, size = boxes[:, None, :2], (boxes[:, 2:] - boxes[:, :2])[:, None, :]
        pts = origin + ref[None] * size
        return cls(pts[:, :2], pts[:, 2], pts[:, 3])

    @classmethod
    def from_five_points(cls, points: Tensor) -> "FaceGeometry":
        """Detector landmarks (N, 5, 2): left eye, right eye, nose, mouth left, mouth right."""
        return cls(points[:, :2], points[:, 2], points[:, 3:5].mean(1))

    def jittered(self, amount: float, generator: torch.Generator | None = None) -> "FaceGeometry":
        """Random scale, shift and roll around the nose, so training sees varied placements."""
        n, dev = len(self), self.nose.device
        u = lambda *shape: torch.rand(*shape, device=dev, generator=generator) * 2 - 1  # noqa: E731
        scale = 1 + amount * u(n, 1, 1)
        shift = amount * 0.4 * u(n, 1, 2) * (self.eyes[:, 1:2] - self.eyes[:, :1]).norm(dim=2, keepdim=True)
        angle = amount * 1.5 * u(n)  # radians; 0.1 jitter = +-8.6 degrees
        rot = torch.stack([torch.stack([angle.cos(), -angle.sin()], 1), torch.stack([angle.sin(), angle.cos()], 1)], 1)
        centre = self.nose[:, None]
        pts = torch.cat([self.eyes, self.nose[:, None], self.mouth[:, None]], 1)
        pts = centre + torch.einsum("nij,nkj->nki", rot, (pts - centre) * scale) + shift
        return FaceGeometry(pts[:, :2], pts[:, 2], pts[:, 3])


@dataclass(frozen=True)
class MaskLook:
    """Per-image style and colour choices (indices into STYLES / COLOURS) and random draws."""

    style: Tensor  # (N,) long
    colour: Tensor  # (N,) long
    rgb: Tensor  # (N, 3) base colour 0..255
    rgb2: Tensor  # (N, 3) second colour of patterns
    pattern: Tensor  # (N,) long: 0 stripes, 1 dots, 2 checks
    params: Tensor  # (N, 8) uniform [0, 1) draws that vary each shape


def random_looks(n: int, device: torch.device, styles=STYLES, colours=COLOURS,
                 generator: torch.Generator | None = None) -> MaskLook:
    """Looks drawn uniformly from the given style and colour names."""
    for name, allowed, known in (("style", styles, STYLES), ("colour", colours, COLOURS)):
        bad = [s for s in allowed if s not in known]
        if bad or not allowed:
            raise ValueError(f"unknown mask {name} {bad or '(none given)'}; known: {', '.join(known)}")
    rand = lambda *shape: torch.rand(*shape, device=device, generator=generator)  # noqa: E731
    pick = lambda names, table: torch.tensor([table.index(s) for s in names], device=device)[  # noqa: E731
        (rand(n) * len(names)).long().clamp(max=len(names) - 1)]
    style, colour = pick(styles, STYLES), pick(colours, COLOURS)
    # Base colours: plain = white / pale blue / pale grey; dark = black / navy / charcoal;
    # coloured and patterned = any hue, medium to bright.
    plain = torch.tensor([[236, 238, 240], [176, 208, 232], [205, 208, 212]], device=device, dtype=torch.float32)
    dark = torch.tensor([[28, 28, 32], [32, 40, 72], [70, 72, 76]], device=device, dtype=torch.float32)
    which = (rand(n) * 3).long().clamp(max=2)
    hue = _hue_rgb(rand(n), 0.45 + 0.4 * rand(n), 140 + 100 * rand(n))
    rgb = torch.where((colour == 0)[:, None], plain[which], torch.where((colour == 1)[:, None], dark[which], hue))
    rgb2 = torch.where((rand(n) < 0.5)[:, None], _hue_rgb(rand(n), 0.6 * rand(n), 60 + 190 * rand(n)),
                       255 - rgb * 0.8)
    return MaskLook(style, colour, rgb, rgb2, (rand(n) * 3).long().clamp(max=2), rand(n, 8))


def _hue_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """HSV (h in [0, 1), s in [0, 1], v in 0..255) to RGB, batched."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)
    f = 1 - s[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return v[:, None] * f


# Training draws the mask layer at no more than this size and upsamples it: a 224 px batch
# costs ~4x less, and edges stay within a pixel of sharp at the sizes FER models use.
TRAIN_RENDER_SIZE = 128


def draw_masks(images: Tensor, geometry: FaceGeometry, look: MaskLook, select: Tensor | None = None,
               max_render: int | None = None) -> Tensor:
    """Images (N, 3, H, W) float in 0..255 with masks drawn on the `select`ed ones (bool (N,)).

    Grey images (all channels equal, like FER data) get grey masks, so a mask never adds
    colour that the rest of the image could not have. `max_render` caps the resolution the
    mask layer is drawn at (None: full resolution).
    """
    n, _, h, w = images.shape
    index = torch.arange(n, device=images.device) if select is None else select.nonzero().flatten()
    if len(index) == 0:
        return images
    chosen = images[index]
    geometry = FaceGeometry(geometry.eyes[index], geometry.nose[index], geometry.mouth[index])
    look = MaskLook(*(t[index.to(t.device)] for t in (look.style, look.colour, look.rgb, look.rgb2, look.pattern,
                                                       look.params)))
    f = min(1.0, max_render / max(h, w)) if max_render else 1.0
    rh, rw = max(8, round(h * f)), max(8, round(w * f))
    # The scene's light at render size: masks take the shading of the face they cover.
    light = F.adaptive_avg_pool2d(chosen.mean(1, keepdim=True), (rh, rw))
    alpha, premultiplied = _mask_layer(geometry, look, len(index), rh, rw, images.device, images.dtype, light)
    if (rh, rw) != (h, w):
        alpha = F.interpolate(alpha, size=(h, w), mode="bilinear", align_corners=False)
        premultiplied = F.interpolate(premultiplied, size=(h, w), mode="bilinear", align_corners=False)
    gray = ((chosen[:, 0] == chosen[:, 1]) & (chosen[:, 1] == chosen[:, 2])).flatten(1).all(1).view(-1, 1, 1, 1)
    premultiplied = torch.where(gray, premultiplied.mean(1, keepdim=True).expand_as(premultiplied), premultiplied)
    out = images.clone()
    out[index] = chosen * (1 - alpha) + premultiplied
    return out


def _mask_layer(geometry: FaceGeometry, look: MaskLook, n: int, h: int, w: int, dev, dtype,
                light: Tensor) -> tuple[Tensor, Tensor]:
    """(coverage (N, 1, H, W), colour x coverage (N, 3, H, W)) of mask and ear loops;
    `light` (N, 1, H, W) is the image's brightness, whose broad shading the mask takes on."""
    eyes, nose, mouth = geometry.eyes.to(dev, dtype), geometry.nose.to(dev, dtype), geometry.mouth.to(dev, dtype)
    p = look.params.to(dev, dtype)
    style = look.style.to(dev)
    col = lambda t: t.view(n, 1, 1)  # noqa: E731

    # Face frame: origin at the nose tip, x along the eye line, in units of eye distance d
    # (pixel aspect taken into account, so non-square images keep round shapes).
    scale = torch.tensor([w, h], device=dev, dtype=dtype)
    eyes_px, nose_px, mouth_px = eyes * scale, nose * scale, mouth * scale
    axis = eyes_px[:, 1] - eyes_px[:, 0]
    d = axis.norm(dim=1).clamp(min=1.0)
    ex, ey = axis[:, 0] / d, axis[:, 1] / d  # unit x of the face frame; y is (-ey, ex)
    eye_mid = eyes_px.mean(1)
    ys, xs = torch.meshgrid(torch.arange(h, device=dev, dtype=dtype) + 0.5,
                            torch.arange(w, device=dev, dtype=dtype) + 0.5, indexing="ij")
    dx, dy = xs[None] - col(nose_px[:, 0]), ys[None] - col(nose_px[:, 1])
    u = (dx * col(ex) + dy * col(ey)) / col(d)  # across the face
    v = (-dx * col(ey) + dy * col(ex)) / col(d)  # down the face
    proj = lambda pt: ((pt - nose_px) * torch.stack([-ey, ex], 1)).sum(1) / d  # noqa: E731
    v_eye, v_mouth = proj(eye_mid), proj(mouth_px).clamp(min=0.25)

    surgical, cloth, n95, kn95 = (style == i for i in range(4))
    # Edges, by style: top over the nose bridge, bottom under the chin, half width at the cheeks.
    top = v_eye * (0.52 + 0.12 * p[:, 0])
    bottom = v_mouth + 0.62 + 0.18 * p[:, 1] + torch.where(cloth | kn95, 0.06, 0.0)
    half = 0.98 + 0.14 * p[:, 2] - torch.where(n95, 0.08, 0.0)
    arch = torch.where(surgical, 0.04, torch.where(kn95, 0.18, 0.10))  # top edge rises over the nose
    sag = torch.where(surgical, 0.10, torch.where(n95, 0.45, torch.where(kn95, 0.50, 0.38)))  # bottom rounds up
    taper = torch.where(surgical, 0.10, torch.where(n95, 0.35, 0.22))  # narrower under the chin
    height = col(bottom - top)
    t = ((v - col(top)) / height).clamp(0, 1)  # 0 at the top edge, 1 at the bottom
    half_at = col(half) * (1 - col(taper) * t**2)
    r = (u / half_at).clamp(-1.5, 1.5)  # -1..1 across the mask
    top_edge = col(top) - col(arch) * (1 - r.abs()).clamp(min=0) ** 2
    top_edge = top_edge + torch.where(col(surgical), 0.06 * r**2, 0.0)  # surgical: straight, bends at the cheeks
    bottom_edge = col(bottom) - col(sag) * height * r**2
    # Coverage: distance (in pixels) inside the nearest edge, blended over one pixel.
    px = col(d)
    inside = torch.minimum(torch.minimum(v - top_edge, bottom_edge - v), half_at - u.abs()) * px
    alpha = (inside + 0.5).clamp(0, 1)

    # Shading: rounded cloth is darker towards its sides and bottom; pleats and seams fold light.
    shade = 1 - 0.22 * r.abs() ** 3 - 0.10 * t**2
    pleats = 0.5 + 0.5 * torch.cos(2 * math.pi * (t * (3.0 + p[:, 3].round().view(n, 1, 1)) + 0.25))
    shade = shade - torch.where(col(surgical), 0.16 * pleats**6, 0.0)
    seam = torch.exp(-((u * px) ** 2) / 1.2)  # a centre line about a pixel wide
    shade = shade - torch.where(col(kn95 | cloth), 0.22 * seam, 0.0)
    shade = shade + torch.where(col(kn95), 0.10 * torch.sign(u) * (1 - t), 0.0)  # one half catches the light
    shade = shade + torch.where(col(n95), 0.12 * (1 - (r**2 + (2 * t - 1) ** 2)).clamp(min=0), 0.0)  # the cup
    wire = torch.exp(-(((v - top_edge) * px - 1.2) ** 2) / 0.8)  # nose wire and hem along the top
    shade = shade - torch.where(col(surgical | kn95), 0.12 * wire, 0.0)

    colour = look.rgb.to(dev, dtype).view(n, 3, 1, 1).expand(n, 3, h, w)
    patterned = (look.colour.to(dev) == COLOURS.index("patterned")).view(n, 1, 1, 1)
    period = (0.28 + 0.2 * p[:, 4]).view(n, 1, 1)
    kind = look.pattern.to(dev).view(n, 1, 1)
    stripes = torch.sin(2 * math.pi * (u * 0.7 + v) / period) > 0.35
    dots = (torch.remainder(u / period, 1) - 0.5) ** 2 + (torch.remainder(v / period, 1) - 0.5) ** 2 < 0.06
    checks = (torch.floor(u / period) + torch.floor(v / period)).remainder(2) > 0.5
    motif = torch.where(kind == 0, stripes, torch.where(kind == 1, dots, checks)).unsqueeze(1)
    second = look.rgb2.to(dev, dtype).view(n, 3, 1, 1)
    colour = torch.where(patterned & motif, second, colour)
    # Fabric: a fine weave, so the mask is not a perfectly flat region.
    weave = torch.sin(2 * math.pi * (u * px / 2.3 + p[:, 5].view(n, 1, 1))) * torch.sin(
        2 * math.pi * (v * px / 2.3 + p[:, 6].view(n, 1, 1)))
    shade = shade + 0.025 * weave
    # Broad shading: the brightness of the face around the mask on a coarse 6 x 6 grid,
    # interpolated across it, relative to its mean: a face lit from one side gives a mask lit
    # from that side. Only pixels outside the mask count, so nothing under it (a smile least
    # of all) can show through.
    outside = (alpha < 0.5).unsqueeze(1).to(dtype)
    overall = (light * outside).sum((2, 3), keepdim=True) / outside.sum((2, 3), keepdim=True).clamp(min=1)
    num, den = F.adaptive_avg_pool2d(light * outside, 6), F.adaptive_avg_pool2d(outside, 6)
    coarse = torch.where(den > 0.05, num / den.clamp(min=1e-6), overall)
    broad = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    relight = (broad / overall.clamp(min=1.0)).clamp(0.6, 1.3) ** 0.5
    mask_rgb = (colour * shade.unsqueeze(1) * relight).clamp(0, 255)

    # Ear loops (surgical, kn95): thin strings from the mask's upper and lower corners
    # towards the ears, beyond the cheeks.
    loops = torch.zeros_like(alpha)
    for v0, v1 in ((0.15, -0.05), (0.85, 0.25)):
        vv = col(top) + v0 * height
        ue = col(half) * (1 - col(taper) * v0**2)
        target_v = col(v_eye) * 0.5 + v1 * height
        for sign in (-1.0, 1.0):
            loops = torch.maximum(loops, _segment(u, v, sign * ue, vv, sign * (ue + 0.5), target_v, px))
    loops = loops * col((surgical | kn95).to(dtype))
    loop_rgb = torch.full_like(mask_rgb, 225.0)

    a = alpha.unsqueeze(1)
    lo = loops.unsqueeze(1) * (1 - a)  # loops show where the mask does not cover them
    return a + lo, mask_rgb * a + loop_rgb * lo


def _segment(u: Tensor, v: Tensor, u0, v0, u1, v1, px: Tensor, width_px: float = 0.7) -> Tensor:
    """Coverage (0..1) of a thin line from (u0, v0) to (u1, v1) in the face frame."""
    du, dv = u1 - u0, v1 - v0
    length2 = (du**2 + dv**2).clamp(min=1e-6)
    t = (((u - u0) * du + (v - v0) * dv) / length2).clamp(0, 1)
    dist = ((u - (u0 + t * du)) ** 2 + (v - (v0 + t * dv)) ** 2).sqrt() * px
    return (width_px - dist + 0.5).clamp(0, 1)


def mask_batch(images: Tensor, p: float, face_box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0),
               jitter: float = 0.1, generator: torch.Generator | None = None) -> Tensor:
    """Training augmentation: a random mask on each image with probability `p`, placed by
    aligned-face geometry in `face_box` (normalised; the whole image for face crops)."""
    n = images.shape[0]
    if p <= 0 or n == 0:
        return images
    dev = images.device
    select = torch.rand(n, device=dev, generator=generator) < p
    if not bool(select.any()):
        return images
    boxes = torch.tensor(face_box, device=dev, dtype=images.dtype).expand(n, 4)
    geometry = FaceGeometry.from_boxes(boxes).jittered(jitter, generator)
    return draw_masks(images, geometry, random_looks(n, dev, generator=generator), select, TRAIN_RENDER_SIZE)
