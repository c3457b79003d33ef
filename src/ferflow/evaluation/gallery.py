"""The error gallery: per true class, the faces the model got wrong with the most confidence.

One PNG row per true class: its label and error count, then up to `per_class` tiles of
~96 px, most confident mistake first, each captioned "pred <label> <p>" (p = the predicted
class's probability) and the image's file name. Composed with PIL (exact pixel size, no
figure state) in matplotlib's bundled DejaVu font, so every machine draws the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ferflow.fileio import atomic_path

TILE = 96  # px, square face tile
GAP = 12  # px between tiles: room for the caption's width
CAPTION = 28  # px under each tile: two text lines
ROW_GAP = 8
LABEL_W = 112  # px, the row-label column
HEADER = 26
FONT_PX, SMALL_PX = 11, 10
BACKGROUND, INK, MISTAKE, FAINT = (255, 255, 255), (20, 20, 20), (170, 20, 20), (110, 110, 110)


def most_confident_mistakes(y_true: np.ndarray, probs: np.ndarray, n_classes: int, per_class: int) -> list[np.ndarray]:
    """For each true class, the indices of its wrong predictions with the highest
    predicted-class probability, at most `per_class`, most confident first; ties keep
    the lower index first (the cache order), so the selection is reproducible."""
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true)
    pred = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    wrong = pred != y_true
    out = []
    for cls in range(n_classes):
        idx = np.flatnonzero(wrong & (y_true == cls))  # ascending: stable sort keeps index order on ties
        out.append(idx[np.argsort(-confidence[idx], kind="stable")][:per_class])
    return out


def canvas_size(n_classes: int, per_class: int) -> tuple[int, int]:
    """(width, height) in pixels of a gallery."""
    return LABEL_W + per_class * (TILE + GAP), HEADER + n_classes * (TILE + CAPTION + ROW_GAP)


def _font(px: int, bold: bool = False):
    import matplotlib

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), px)
    except OSError:  # a Pillow built without FreeType: its bitmap font still labels the tiles
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, cut in the middle with "…" until it fits `width` pixels (file names keep their end)."""
    if draw.textlength(text, font=font) <= width:
        return text
    head, tail = text[: len(text) // 2], text[len(text) // 2:]
    while head or tail:
        if len(head) >= len(tail):
            head = head[:-1]
        else:
            tail = tail[1:]
        short = f"{head}…{tail}"
        if draw.textlength(short, font=font) <= width:
            return short
    return "…"


def _tile(face: np.ndarray) -> Image.Image:
    image = Image.fromarray(np.ascontiguousarray(face, dtype=np.uint8))
    return image if image.size == (TILE, TILE) else image.resize((TILE, TILE), Image.Resampling.BILINEAR)


def write_error_gallery(
    path: Path,
    images: np.ndarray,
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    paths: Optional[Sequence[str]] = None,
    per_class: int = 8,
    title: str = "",
) -> list[np.ndarray]:
    """Write the gallery PNG to `path` atomically; return the chosen indices per true class.

    `images` is (N, S, S, 3) uint8 and may be a memmap: only the chosen rows are read.
    """
    k, n = len(classes), len(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (n, k):
        raise ValueError(f"probs must have shape ({n}, {k}), got {probs.shape}")
    if len(images) != n:
        raise ValueError(f"{len(images)} images for {n} labels")
    if paths is not None and len(paths) != n:
        raise ValueError(f"paths has {len(paths)} entries for {n} labels")
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    y_true = np.asarray(y_true)
    chosen = most_confident_mistakes(y_true, probs, k, per_class)
    flat = np.concatenate(chosen).astype(np.int64)
    order = np.argsort(flat, kind="stable")  # a memmap reads fastest in file order
    faces = np.empty((len(flat), *np.shape(images)[1:]), dtype=np.uint8)
    faces[order] = np.asarray(images[flat[order]])
    pred, confidence = probs.argmax(axis=1), probs.max(axis=1)

    width, height = canvas_size(k, per_class)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font, small, bold = _font(FONT_PX), _font(SMALL_PX), _font(FONT_PX, bold=True)
    heading = "Most confident mistakes per true class (p: probability of the predicted class)"
    draw.text((6, 6), _fit(draw, f"{title} · {heading}" if title else heading, font, width - 12), font=font, fill=INK)
    at = 0
    for cls, picks in enumerate(chosen):
        top = HEADER + cls * (TILE + CAPTION + ROW_GAP)
        total = int((y_true == cls).sum())
        errors = int(((pred != y_true) & (y_true == cls)).sum())
        draw.text((6, top + 4), _fit(draw, f"true {classes[cls]}", bold, LABEL_W - 10), font=bold, fill=INK)
        draw.text((6, top + 20), f"{errors} of {total} wrong", font=small, fill=FAINT)
        if not len(picks):
            note = "no mistakes" if total else "no images of this class"
            draw.text((LABEL_W, top + TILE // 2 - 6), note, font=font, fill=FAINT)
        for col, index in enumerate(picks):
            left = LABEL_W + col * (TILE + GAP)
            canvas.paste(_tile(faces[at]), (left, top))
            at += 1
            caption = f"pred {classes[pred[index]]} {confidence[index]:.2f}"
            draw.text((left, top + TILE + 2), _fit(draw, caption, small, TILE + GAP - 2), font=small, fill=MISTAKE)
            if paths is not None:
                name = Path(str(paths[index])).name
                draw.text((left, top + TILE + 15), _fit(draw, name, small, TILE + GAP - 2), font=small, fill=FAINT)

    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", optimize=True)
    return chosen
