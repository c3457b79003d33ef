"""Offline demo archives: procedurally drawn faces laid out like the three LFW emotion zips.

The same persons, images and labels appear in all three archives (plain, masked, masked
face-cut), so a demo run exercises the real pipeline end to end without any download.
Output is a pure function of `DemoSettings`: the same settings give byte-identical zips.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ferflow.config import DemoSettings
from ferflow.data.packing import write_zip
from ferflow.fileio import atomic_write_bytes
from ferflow.labels import CLASSES

DEMO_ARCHIVES = ("LFW-FER", "M-LFW-FER", "M-LFW-FER-face-cut")
# The label contract is ferflow.labels.CLASSES; this is only the order the generator draws
# classes in (changing it changes every demo archive), and the archives' own two splits.
GENERATION_ORDER = ("positive", "negative", "neutral")
ARCHIVE_SPLITS = ("train", "eval")

# Where each archive keeps `{split}/{class}/X.jpg`, mimicking the real zips.
_PREFIX = {"LFW-FER": "LFW-FER/", "M-LFW-FER": "M-LFW-FER/M-LFW-FER/", "M-LFW-FER-face-cut": ""}
# macOS junk the real M-LFW-FER zip carries; readers must skip it.
_JUNK = {
    "M-LFW-FER/.DS_Store": b"\x00\x00\x00\x01Bud1" + bytes(26),
    "__MACOSX/M-LFW-FER/._M-LFW-FER": b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(10),
}
_MASK_COLOURS = ((173, 216, 236), (150, 200, 230), (236, 238, 240), (40, 40, 46))
_HAIR_COLOURS = ((25, 20, 18), (60, 40, 25), (110, 75, 40), (200, 165, 100), (150, 70, 35), (170, 170, 165))


@dataclass(frozen=True)
class DemoArchive:
    name: str
    path: Path
    sha256: str
    size: int
    n_images: int


@dataclass(frozen=True)
class IdentityTraits:
    """What stays fixed across one synthetic person's images."""

    face_w: float  # half-width as a fraction of the canvas
    face_h: float
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    hair_style: int  # 0 short, 1 long, 2 shaved
    eye_spacing: float  # eye centre offset as a fraction of face half-width
    iris: tuple[int, int, int]
    brow_w: float
    shirt: tuple[int, int, int]


def _rgb(values: object) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in np.clip(np.asarray(values), 0, 255))
    return (r, g, b)


def random_traits(rng: np.random.Generator) -> IdentityTraits:
    tone = rng.uniform(0.0, 1.0)
    skin = (int(245 - 150 * tone), int(215 - 140 * tone), int(190 - 125 * tone))
    base = _HAIR_COLOURS[int(rng.integers(len(_HAIR_COLOURS)))]
    return IdentityTraits(
        face_w=float(rng.uniform(0.25, 0.29)),
        face_h=float(rng.uniform(0.31, 0.36)),
        skin=skin,
        hair=_rgb(np.array(base) + rng.integers(-15, 16, 3)),
        hair_style=int(rng.integers(0, 3)),
        eye_spacing=float(rng.uniform(0.36, 0.46)),
        iris=_rgb(rng.integers(20, 120, 3)),
        brow_w=float(rng.uniform(0.035, 0.05)),
        shirt=_rgb(rng.integers(30, 220, 3)),
    )


def _curve(cx: float, cy: float, half_w: float, depth: float, n: int = 9) -> list[tuple[float, float]]:
    """Parabola through both corners; positive depth bows the middle downwards (a smile)."""
    return [(cx + t * half_w, cy + depth * (1 - t * t)) for t in np.linspace(-1, 1, n)]


def _draw_face(d: ImageDraw.ImageDraw, S: int, cx: float, cy: float, tr: IdentityTraits,
               label: str, s: float, rng: np.random.Generator) -> None:
    a, b = tr.face_w * S, tr.face_h * S
    sign = {"positive": 1.0, "negative": -1.0, "neutral": 0.0}[label]
    jitter = rng.normal(0, 0.06)  # neutral faces are never perfectly flat
    # Neck and shoulders first so the face overlaps them.
    d.rectangle([cx - 0.35 * a, cy + 0.6 * b, cx + 0.35 * a, cy + 1.4 * b], fill=tr.skin)
    d.ellipse([cx - 2.2 * a, cy + 1.15 * b, cx + 2.2 * a, cy + 2.8 * b], fill=tr.shirt)
    if tr.hair_style == 1:
        d.rectangle([cx - 1.12 * a, cy - 0.6 * b, cx + 1.12 * a, cy + 0.9 * b], fill=tr.hair)
    hair_r = 1.06 if tr.hair_style != 2 else 1.0
    d.ellipse([cx - hair_r * 1.08 * a, cy - 1.15 * b, cx + hair_r * 1.08 * a, cy + 0.5 * b], fill=tr.hair)
    d.ellipse([cx - 1.12 * a, cy - 0.05 * b, cx - 0.9 * a, cy + 0.3 * b], fill=tr.skin)  # ears
    d.ellipse([cx + 0.9 * a, cy - 0.05 * b, cx + 1.12 * a, cy + 0.3 * b], fill=tr.skin)
    d.ellipse([cx - a, cy - b, cx + a, cy + b], fill=tr.skin)
    if tr.hair_style != 2:  # fringe over the forehead
        d.chord([cx - 1.02 * a, cy - 1.12 * b, cx + 1.02 * a, cy - 0.12 * b], 180, 360, fill=tr.hair)
    dark = tuple(int(c * 0.55) for c in tr.skin)
    ink = tuple(int(c * 0.3) for c in tr.hair)

    # Eyes: a smile raises the cheeks and narrows them, a frown narrows them a little.
    ey = cy - 0.08 * b + rng.normal(0, 0.01) * b
    open_ = np.clip(1.0 - 0.5 * s * (sign > 0) - 0.25 * s * (sign < 0) + rng.normal(0, 0.07), 0.3, 1.2)
    ew, eh = 0.17 * a, 0.085 * b * open_
    for side in (-1, 1):
        ex = cx + side * tr.eye_spacing * a
        d.ellipse([ex - ew, ey - eh, ex + ew, ey + eh], fill=(245, 245, 240), outline=ink, width=max(1, S // 120))
        r = min(eh, 0.09 * a)
        d.ellipse([ex - r, ey - r, ex + r, ey + r], fill=tr.iris)
        d.ellipse([ex - r / 2.2, ey - r / 2.2, ex + r / 2.2, ey + r / 2.2], fill=(10, 10, 10))
        if sign > 0:  # raised lower lid / crow's feet
            d.line(_curve(ex, ey + eh + 0.03 * b, ew * 1.1, -0.05 * b * s), fill=dark, width=max(1, S // 90))
            for k in (-1, 0, 1):
                x0 = ex + side * ew * 1.15
                d.line([(x0, ey + k * 0.03 * b), (x0 + side * 0.08 * a * s, ey + k * 0.06 * b)], fill=dark,
                       width=max(1, S // 150))
        # Brows: inner ends dip for a frown, the whole brow lifts and arches for a smile.
        by = ey - 0.2 * b - 0.06 * b * s * (sign > 0) + rng.normal(0, 0.012) * b
        inner = 0.16 * b * s * (sign < 0) + jitter * 0.05 * b
        outer = -0.05 * b * s * (sign < 0)
        xi, xo = ex - side * ew * 1.1, ex + side * ew * 1.3
        mid = ((xi + xo) / 2, by - 0.04 * b * (1 + s * (sign > 0)) + (inner + outer) / 2)
        d.line([(xi, by + inner), mid, (xo, by + outer)], fill=ink, width=int(tr.brow_w * S), joint="curve")
    if sign < 0 and s > 0.4:  # furrow between the brows
        for k in (-1, 1):
            x = cx + k * 0.06 * a
            d.line([(x, ey - 0.22 * b), (x, ey - 0.1 * b)], fill=dark, width=max(1, S // 150))

    # Nose and mouth: the part a mask hides.
    d.line([(cx, ey + 0.05 * b), (cx - 0.05 * a, cy + 0.3 * b), (cx + 0.04 * a, cy + 0.33 * b)], fill=dark,
           width=max(1, S // 110))
    my, mw = cy + 0.58 * b, (0.42 + 0.1 * s * (sign > 0)) * a
    depth = (sign * s + jitter) * 0.25 * b
    lip = (170, 70, 80) if tr.skin[0] > 150 else (110, 45, 50)
    if sign > 0 and s > 0.55:
        gap = 0.14 * b * (s - 0.4)
        top, bottom = _curve(cx, my, mw, depth * 0.5), _curve(cx, my, mw, depth + gap)
        d.polygon(top + bottom[::-1], fill=(90, 20, 30), outline=lip)
        teeth = _curve(cx, my, mw * 0.8, depth * 0.5 + gap * 0.6)
        d.polygon(_curve(cx, my, mw * 0.8, depth * 0.5) + teeth[::-1], fill=(250, 250, 245))
    else:
        d.line(_curve(cx, my, mw, depth), fill=lip, width=max(2, int(0.09 * b)), joint="curve")


def _draw_mask(d: ImageDraw.ImageDraw, S: int, cx: float, cy: float, tr: IdentityTraits,
               rng: np.random.Generator) -> None:
    a, b = tr.face_w * S, tr.face_h * S
    colour = _MASK_COLOURS[int(rng.integers(len(_MASK_COLOURS)))]
    colour = tuple(int(np.clip(c + rng.integers(-12, 12), 0, 255)) for c in colour)
    top = cy + rng.uniform(0.02, 0.1) * b
    d.line([(cx - 1.15 * a, cy + 0.05 * b), (cx - 0.8 * a, top + 0.2 * b)], fill=(230, 230, 230), width=S // 90)
    d.line([(cx + 1.15 * a, cy + 0.05 * b), (cx + 0.8 * a, top + 0.2 * b)], fill=(230, 230, 230), width=S // 90)
    outline = [(cx - 1.02 * a, top + 0.12 * b), (cx - 0.5 * a, top + 0.03 * b), (cx, top - 0.06 * b),
               (cx + 0.5 * a, top + 0.03 * b), (cx + 1.02 * a, top + 0.12 * b), (cx + 0.9 * a, cy + 0.7 * b),
               (cx + 0.45 * a, cy + 1.0 * b), (cx, cy + 1.1 * b), (cx - 0.45 * a, cy + 1.0 * b),
               (cx - 0.9 * a, cy + 0.7 * b)]
    d.polygon(outline, fill=colour)
    pleat = tuple(int(c * 0.8) for c in colour)
    for k in (0.35, 0.6, 0.85):  # pleats make it read as fabric
        d.line([(cx - 0.9 * a, top + k * b), (cx + 0.9 * a, top + k * b)], fill=pleat, width=max(1, S // 150))


def _background(rng: np.random.Generator, S: int) -> np.ndarray:
    base = rng.uniform(50, 210) + rng.normal(0, 18, 3)  # mostly muted, slightly tinted
    blobs = rng.normal(0, 28, (5, 5, 1)) + rng.normal(0, 8, (5, 5, 3))  # low-frequency texture
    tex = np.asarray(Image.fromarray(np.uint8(np.clip(128 + blobs, 0, 255))).resize((S, S), Image.BILINEAR))
    return np.clip(base + tex.astype(np.float32) - 128, 0, 255).astype(np.uint8)


def _finish(rng: np.random.Generator, img: Image.Image, size: int) -> np.ndarray:
    arr = np.asarray(img.resize((size, size), Image.BILINEAR, reducing_gap=2.0), dtype=np.float32)
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(rng.uniform(1, 7))
    return np.clip(arr, 0, 255).astype(np.uint8)


def render_views(rng: np.random.Generator, label: str, size: int, traits: IdentityTraits,
                 strength: float | None = None) -> dict[str, np.ndarray]:
    """One photo as each archive holds it: {archive name: HxWx3 uint8}."""
    if label not in CLASSES:
        raise ValueError(f"label must be one of {CLASSES}, got {label!r}")
    S = 2 * size  # drawn at 2x, then downsampled for anti-aliasing
    s = float(rng.uniform(0.25, 1.0) if strength is None else strength)
    scale = rng.uniform(0.88, 1.12)
    tr = replace(traits, face_w=traits.face_w * scale, face_h=traits.face_h * scale)
    cx, cy = S / 2 + rng.normal(0, 0.04) * S, S / 2 + 0.06 * S + rng.normal(0, 0.03) * S
    angle = float(rng.uniform(-15, 15))

    face = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    _draw_face(ImageDraw.Draw(face), S, cx, cy, tr, label, s, rng)
    masked = face.copy()
    _draw_mask(ImageDraw.Draw(masked), S, cx, cy, tr, rng)

    bg = Image.fromarray(_background(rng, S)).convert("RGBA")
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S - 0.5
    theta = rng.uniform(0, 2 * math.pi)  # directional light plus global gain/contrast
    light = rng.uniform(0.75, 1.2) + rng.uniform(0, 0.5) * (xx * math.cos(theta) + yy * math.sin(theta))
    contrast = np.float32(rng.uniform(0.75, 1.15))
    gain = (light * contrast)[..., None]

    def compose(layer: Image.Image) -> Image.Image:
        rot = layer.rotate(angle, resample=Image.BILINEAR, center=(cx, cy))
        arr = np.asarray(Image.alpha_composite(bg, rot).convert("RGB"), dtype=np.float32)
        lit = arr * gain + (1 - contrast) * float(arr.mean()) * float(light.mean())
        return Image.fromarray(np.clip(lit, 0, 255).astype(np.uint8))

    plain, mask_img = compose(face), compose(masked)
    half = max(tr.face_w, tr.face_h) * S * 1.12
    # Kept inside the canvas so the crop never pads with black.
    x0 = int(np.clip(cx - half, 0, S - 2 * half))
    y0 = int(np.clip(cy - half * 1.05, 0, S - 2 * half))
    box = (x0, y0, x0 + int(2 * half), y0 + int(2 * half))
    return {
        "LFW-FER": _finish(rng, plain, size),
        "M-LFW-FER": _finish(rng, mask_img, size),
        "M-LFW-FER-face-cut": _finish(rng, mask_img.crop(box), size),
    }


def render_face(rng: np.random.Generator, label: str, size: int, traits: IdentityTraits,
                strength: float | None = None) -> np.ndarray:
    """An unmasked face showing `label`, HxWx3 uint8."""
    return render_views(rng, label, size, traits, strength)["LFW-FER"]


def _plan(settings: DemoSettings) -> list[tuple[str, str, list[str]]]:
    """(person, split, labels of their images): exact per-class counts, identity-disjoint splits."""
    rng = np.random.default_rng([settings.seed, 1])
    n = settings.images_per_class
    n_eval = min(n - 1, max(1, round(n * settings.eval_fraction)))
    groups: list[tuple[str, list[str]]] = []
    for split, count in zip(ARCHIVE_SPLITS, (n - n_eval, n_eval)):
        labels = [c for c in GENERATION_ORDER for _ in range(count)]
        rng.shuffle(labels)
        i = 0
        while i < len(labels):
            k = int(rng.integers(2, 8))
            groups.append((split, labels[i:i + k]))
            i += k
    order = rng.permutation(len(groups))  # person numbers don't reveal the split
    width = max(3, len(str(len(groups))))
    return [(f"Demo_Person_{j + 1:0{width}d}", *groups[g]) for j, g in enumerate(order)]


def _zip_bytes(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    write_zip(buf, sorted(entries.items()))
    return buf.getvalue()


def generate_demo_archives(settings: DemoSettings, out_dir: Path | None = None) -> list[DemoArchive]:
    """Write the three demo zips and SHA256SUMS into out_dir (default settings.out_dir)."""
    out = Path(settings.out_dir if out_dir is None else out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict[str, bytes]] = {name: {} for name in DEMO_ARCHIVES}
    for p, (person, split, labels) in enumerate(_plan(settings)):
        traits = random_traits(np.random.default_rng([settings.seed, 2, p]))
        for i, label in enumerate(labels):
            # One generator per image: the result does not depend on iteration order.
            rng = np.random.default_rng([settings.seed, 3, p, i])
            views = render_views(rng, label, settings.image_size, traits)
            quality = int(rng.integers(70, 96))
            for name, arr in views.items():
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, "JPEG", quality=quality)
                entries[name][f"{_PREFIX[name]}{split}/{label}/{person}_{i + 1:04d}.jpg"] = buf.getvalue()
    entries["M-LFW-FER"].update(_JUNK)

    archives = []
    for name in DEMO_ARCHIVES:
        data = _zip_bytes(entries[name])
        path = out / f"{name}.zip"
        atomic_write_bytes(path, data)
        n_images = sum(1 for k in entries[name] if k.endswith(".jpg"))
        archives.append(DemoArchive(name, path, hashlib.sha256(data).hexdigest(), len(data), n_images))
    sums = "".join(f"{a.sha256}  {a.path.name}\n" for a in archives)
    atomic_write_bytes(out / "SHA256SUMS", sums.encode())
    return archives


def demo_sources(archives: list[DemoArchive]) -> list[dict]:
    """Entries for params `data.archives` pointing at the generated zips."""
    return [{"name": a.name, "uri": str(a.path), "sha256": a.sha256, "size": a.size} for a in archives]
